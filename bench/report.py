"""Benchmark report: JSON, Markdown with PNG plots, and a terminal summary."""

from __future__ import annotations

import datetime
import json
import logging
import math
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clinfer.bench.schema import BenchResult, Plot, machine_info
from rich.console import Group
from rich.table import Table
from rich.text import Text

logger = logging.getLogger(__name__)

ERROR_KEY = "error"
"""Key of ``BenchResult.raw`` that contains the error of a benchmark that failed."""


@dataclass(frozen=True)
class ReportPaths:
    """Files written by :func:`write_report`."""

    json: Path
    markdown: Path
    plots: list[Path] = field(default_factory=list)


def failed_result(
    name: str, title: str, command: str, error: BaseException
) -> BenchResult:
    """Return a result that records a benchmark's error instead of measurements."""
    message = f"{type(error).__name__}: {error}"
    return BenchResult(
        name=name,
        title=title,
        command=command,
        raw={ERROR_KEY: message},
        notes=[f"failed: {message}"],
    )


def git_commit(directory: Path | None = None) -> str | None:
    """Return the commit of the checkout containing ``directory``, or None."""
    cwd = directory or Path(__file__).resolve().parent
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = completed.stdout.strip()
    return commit if completed.returncode == 0 and commit else None


def _finite(value: Any) -> Any:
    """Replace NaN and infinities by None, recursively, so the JSON stays valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _number(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 10**digits:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _target(ratio_target: float | None, higher_is_better: bool) -> str:
    if ratio_target is None:
        return "none"
    return f"{'≥' if higher_is_better else '≤'} {ratio_target:g}"


def _met(met: bool | None) -> str:
    if met is None:
        return "no target"
    return "met" if met else "not met"


def plot_file_name(result: BenchResult, plot: Plot) -> str:
    """Return the PNG file name of one plot of a result."""
    return f"{result.name}_{plot.name}.png"


def draw_plot(plot: Plot, path: Path) -> Path:
    """Draw ``plot`` into a PNG file with matplotlib's Agg backend.

    Series are lines against ``x``, or grouped bars when ``plot.categories`` is set
    (each ``x`` value indexes a category). ``log_x`` applies to lines only, and
    ``log_y`` to both.

    Raises
    ------
    ValueError
        If a series' ``x`` and ``y`` differ in length, or a categorical ``x`` value
        is not an index of ``plot.categories``.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.2), dpi=100)
    axes = figure.add_subplot()
    for series in plot.series:
        if len(series.x) != len(series.y):
            raise ValueError(
                f"series {series.label!r} of plot {plot.name!r} has {len(series.x)} "
                f"x values and {len(series.y)} y values; give one y per x."
            )
    if plot.categories is not None:
        count = max(len(plot.series), 1)
        width = 0.8 / count
        for number, series in enumerate(plot.series):
            positions = []
            for value in series.x:
                index = int(value)
                if index != value or not 0 <= index < len(plot.categories):
                    raise ValueError(
                        f"x value {value} of series {series.label!r} in plot "
                        f"{plot.name!r} is not an index of its "
                        f"{len(plot.categories)} categories."
                    )
                positions.append(index - 0.4 + width * (number + 0.5))
            axes.bar(positions, series.y, width=width, label=series.label)
        axes.set_xticks(range(len(plot.categories)))
        axes.set_xticklabels(plot.categories, rotation=20, ha="right")
    else:
        for series in plot.series:
            axes.plot(series.x, series.y, marker="o", label=series.label)
        if plot.log_x:
            axes.set_xscale("log", base=2)
            ticks = sorted({x for series in plot.series for x in series.x if x > 0})
            axes.set_xticks(ticks)
            axes.set_xticklabels([f"{tick:g}" for tick in ticks])
    if plot.log_y:
        axes.set_yscale("log")
    axes.set_title(plot.title)
    axes.set_xlabel(plot.x_label)
    axes.set_ylabel(plot.y_label)
    axes.grid(True, alpha=0.3)
    if plot.series:
        axes.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _ratio_table(results: Sequence[BenchResult]) -> list[str]:
    lines = [
        "| benchmark | ratio | value | target | met | numerator | denominator "
        "| description |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        if ERROR_KEY in result.raw:
            lines.append(
                f"| {result.name} | – | – | – | failed | – | – | "
                f"{result.raw[ERROR_KEY]} |"
            )
            continue
        for ratio in result.ratios:
            lines.append(
                f"| {result.name} | {ratio.name} | {_number(ratio.value)} "
                f"| {_target(ratio.target, ratio.higher_is_better)} "
                f"| {_met(ratio.met)} | {_number(ratio.numerator)} {ratio.unit} "
                f"| {_number(ratio.denominator)} {ratio.unit} | {ratio.description} |"
            )
    return lines


def _markdown(
    results: Sequence[BenchResult],
    header: dict[str, Any],
    plot_names: dict[tuple[str, str], str],
) -> str:
    machine = header["machine"]
    lines = [
        "# Benchmark report",
        "",
        f"- date: {header['date']}",
        f"- commit: {header['commit'] or 'unknown'}",
    ]
    if header.get("command"):
        lines.append(f"- command: `{header['command']}`")
    memory = machine.get("memory_bytes")
    memory_text = f"{memory / 2**30:.1f} GiB" if memory else "unknown"
    lines += [
        f"- machine: {machine.get('cpus')} CPUs ({machine.get('processor')}), "
        f"{memory_text} memory, {machine.get('system')}, Python "
        f"{machine.get('python')}",
        "",
        "## Ratios",
        "",
        *_ratio_table(results),
        "",
    ]
    for result in results:
        lines += [f"## {result.name}: {result.title}", "", f"`{result.command}`", ""]
        if ERROR_KEY in result.raw:
            lines += [f"**Failed**: {result.raw[ERROR_KEY]}", ""]
        if result.chosen:
            chosen = ", ".join(f"{key} {value}" for key, value in result.chosen.items())
            lines += [f"Chosen: {chosen}.", ""]
        for plot in result.plots:
            file_name = plot_names.get((result.name, plot.name))
            if file_name is not None:
                lines += [f"![{plot.title}]({file_name})", ""]
        notes = [note for note in result.notes if not note.startswith("failed: ")]
        if notes:
            lines += [f"- {note}" for note in notes]
            lines.append("")
    return "\n".join(lines)


def write_report(
    results: list[BenchResult], out_dir: Path, *, command: str | None = None
) -> ReportPaths:
    """Write ``report.json``, ``report.md`` and one PNG per plot into ``out_dir``.

    Parameters
    ----------
    results : list of BenchResult
        Results to report. Those made by :func:`failed_result` appear with their
        error. A plot that cannot be drawn is reported in the notes and skipped.
    out_dir : Path
        Folder to write, created if missing. Files of an earlier report are
        replaced.
    command : str, optional
        The command that produced the whole report, for example
        ``clinfer bench all``.

    Returns
    -------
    ReportPaths
        The files written.

    Raises
    ------
    OSError
        If ``out_dir`` cannot be written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    header: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "commit": git_commit(),
        "command": command,
        "machine": machine_info(),
    }
    plot_names: dict[tuple[str, str], str] = {}
    plot_paths: list[Path] = []
    for result in results:
        for plot in result.plots:
            file_name = plot_file_name(result, plot)
            try:
                plot_paths.append(draw_plot(plot, out_dir / file_name))
            except ValueError as exc:
                logger.warning(
                    "plot %s of %s not drawn: %s", plot.name, result.name, exc
                )
                result.notes.append(f"plot {plot.name} not drawn: {exc}")
                continue
            plot_names[(result.name, plot.name)] = file_name

    json_path = out_dir / "report.json"
    document = {
        **header,
        "results": [result.to_json() for result in results],
        "plots": {
            f"{name}/{plot}": file_name
            for (name, plot), file_name in plot_names.items()
        },
    }
    json_path.write_text(
        json.dumps(_finite(document), indent=2, allow_nan=False) + "\n"
    )
    markdown_path = out_dir / "report.md"
    markdown_path.write_text(_markdown(results, header, plot_names) + "\n")
    logger.info("benchmark report written to %s", markdown_path)
    return ReportPaths(json=json_path, markdown=markdown_path, plots=plot_paths)


def summary(results: Sequence[BenchResult]) -> Group:
    """Return a one-screen terminal summary: the ratio table and any chosen points.

    Returns
    -------
    rich.console.Group
        A renderable for ``rich.console.Console.print``.
    """
    table = Table(title="benchmark ratios")
    for column in ("benchmark", "ratio", "value", "target", "result", "measured"):
        table.add_column(column)
    for result in results:
        if ERROR_KEY in result.raw:
            table.add_row(
                result.name, "–", "–", "–", "[red]failed[/red]", result.raw[ERROR_KEY]
            )
            continue
        if not result.ratios:
            table.add_row(result.name, "–", "–", "–", "no ratio", "")
        for ratio in result.ratios:
            met = ratio.met
            style = "dim"
            if met is True:
                style = "green"
            elif met is False:
                style = "red"
            table.add_row(
                result.name,
                ratio.name,
                _number(ratio.value),
                _target(ratio.target, ratio.higher_is_better),
                f"[{style}]{_met(met)}[/{style}]",
                f"{_number(ratio.numerator)} / {_number(ratio.denominator)} "
                f"{ratio.unit}",
            )
    parts: list[Any] = [table]
    for result in results:
        if result.chosen:
            chosen = ", ".join(f"{key} {value}" for key, value in result.chosen.items())
            parts.append(Text(f"{result.name} chosen: {chosen}"))
    return Group(*parts)
