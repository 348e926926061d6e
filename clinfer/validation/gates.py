"""Go/no-go gates: thresholds on validation metrics, read from a TOML file."""

from __future__ import annotations

import logging
import operator
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from clinfer.errors import ConfigurationError

logger = logging.getLogger(__name__)

DEFAULT_GATES_PATH = Path(__file__).with_name("gates.toml")
GATE_METRICS = (
    "auroc",
    "auroc_ci_lower",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "accuracy",
    "ece",
)
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}


@dataclass(frozen=True)
class Gate:
    """One go/no-go condition: ``metric op value``."""

    metric: str
    op: str
    value: float
    reason: str = ""

    def describe(self) -> str:
        """Return the condition as text, for example ``sensitivity >= 0.85``."""
        return f"{self.metric} {self.op} {self.value:g}"

    def evaluate(self, metrics: Mapping[str, float | None]) -> dict[str, Any]:
        """Return the gate with the observed value and ``GO`` or ``NO-GO``.

        A missing or None metric is NO-GO.
        """
        observed = metrics.get(self.metric)
        passed = observed is not None and OPERATORS[self.op](observed, self.value)
        return {
            "metric": self.metric,
            "op": self.op,
            "value": self.value,
            "condition": self.describe(),
            "observed": observed,
            "outcome": "GO" if passed else "NO-GO",
            "reason": self.reason,
        }


def parse_gates(data: Mapping[str, Any], source: str) -> tuple[Gate, ...]:
    """Build gates from parsed TOML data with a ``gates`` array of tables.

    Raises
    ------
    ConfigurationError
        If ``gates`` is missing or empty, or an entry has an unknown metric or
        operator or a non-numeric value.
    """
    entries = data.get("gates")
    if not isinstance(entries, list) or not entries:
        raise ConfigurationError(
            f"{source} has no [[gates]] entries; see {DEFAULT_GATES_PATH} for the "
            "format"
        )
    gates = []
    for number, entry in enumerate(entries, start=1):
        metric = entry.get("metric")
        op = entry.get("op")
        value = entry.get("value")
        if metric not in GATE_METRICS:
            raise ConfigurationError(
                f"{source} gate {number}: metric {metric!r} is not one of "
                f"{', '.join(GATE_METRICS)}"
            )
        if op not in OPERATORS:
            raise ConfigurationError(
                f"{source} gate {number}: op {op!r} is not one of "
                f"{', '.join(OPERATORS)}"
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigurationError(
                f"{source} gate {number}: value {value!r} is not a number"
            )
        gates.append(Gate(metric, op, float(value), str(entry.get("reason", ""))))
    return tuple(gates)


def load_gates(path: Path | None = None) -> tuple[Gate, ...]:
    """Read gates from a TOML file, by default the bundled ``gates.toml``.

    Raises
    ------
    ConfigurationError
        If the file is missing, is not valid TOML, or its gates are invalid.
    """
    path = Path(path) if path is not None else DEFAULT_GATES_PATH
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigurationError(
            f"gates file {path} not found; pass an existing file to --gates or "
            "omit it to use the bundled gates"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"gates file {path} is not valid TOML: {exc}") from exc
    return parse_gates(data, str(path))


def evaluate_gates(
    gates: Sequence[Gate], metrics: Mapping[str, float | None]
) -> dict[str, Any]:
    """Evaluate every gate; the overall outcome is GO only when all are GO."""
    results = [gate.evaluate(metrics) for gate in gates]
    overall = "GO" if all(item["outcome"] == "GO" for item in results) else "NO-GO"
    return {"overall": overall, "gates": results}
