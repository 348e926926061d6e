"""Result records shared by the benchmarks and the report writer.

Every benchmark returns a :class:`BenchResult`: the ratios it measured side by side,
the series to plot, and its raw figures. ``clinfer.bench.report`` turns a list of
them into JSON, a Markdown report with PNG plots and a terminal summary.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Ratio:
    """One measured ratio: ``numerator / denominator``, both measured in one run.

    ``target`` is the bound the ratio should meet and ``higher_is_better`` its
    direction (throughput ratios aim up, memory ratios aim down). ``None`` for a
    ratio that has no target.
    """

    name: str
    value: float
    numerator: float
    denominator: float
    unit: str
    description: str
    target: float | None = None
    higher_is_better: bool = True

    @property
    def met(self) -> bool | None:
        """Whether the ratio meets its target, or None without a target."""
        if self.target is None:
            return None
        if self.higher_is_better:
            return self.value >= self.target
        return self.value <= self.target


@dataclass(frozen=True)
class Series:
    """One line of a plot: ``y`` against ``x``, both in the units given."""

    label: str
    x: list[float]
    y: list[float]


@dataclass(frozen=True)
class Plot:
    """One PNG plot of the report: a title, axis labels and its lines.

    With ``categories`` the plot is a grouped bar chart: each series' ``x`` values
    index into ``categories`` (transfer syntaxes, designs, ...).
    """

    name: str
    title: str
    x_label: str
    y_label: str
    series: list[Series]
    log_x: bool = False
    log_y: bool = False
    categories: list[str] | None = None


@dataclass
class BenchResult:
    """Measurements of one benchmark.

    ``name`` is a short id (``p1``, ``p2``, ``p4``, ``p5``, ``sweep_pipeline``,
    ...), ``command`` the command line that reproduces it, ``raw`` every figure the
    ratios and plots came from (JSON-serialisable), and ``chosen`` the operating
    point a sweep picked (for example ``{"batch_size": 32}``).
    """

    name: str
    title: str
    command: str
    ratios: list[Ratio] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    chosen: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Return the result as plain JSON types."""
        data = asdict(self)
        for ratio, record in zip(self.ratios, data["ratios"], strict=True):
            record["met"] = ratio.met
        return data


def machine_info() -> dict[str, Any]:
    """Describe the machine a benchmark ran on (no host names or addresses)."""
    memory_bytes = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    memory_bytes = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "memory_bytes": memory_bytes,
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
    }
