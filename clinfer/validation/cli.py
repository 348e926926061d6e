"""Typer command ``clinfer validate``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from clinfer.errors import ClinferError

logger = logging.getLogger(__name__)
console = Console(stderr=True)


def _fail(exc: BaseException) -> NoReturn:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(2)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def validate_command(
    model_dir: Annotated[
        Path,
        typer.Option(
            "--model-dir",
            help="Output folder of `clinfer train`, or one model folder in it.",
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Report folder; one subfolder per model.")
    ],
    cohort: Annotated[
        Path | None,
        typer.Option(
            "--cohort",
            help="Cohort folder the cohort models were trained on (not needed for "
            "the Wisconsin model alone).",
        ),
    ] = None,
    gates: Annotated[
        Path | None,
        typer.Option(
            "--gates", help="Go/no-go gates TOML file; default: the bundled gates."
        ),
    ] = None,
    model_card: Annotated[
        bool,
        typer.Option(
            "--model-card/--no-model-card",
            help="Write model_card.md and model_card.json beside each model.",
        ),
    ] = True,
) -> None:
    """Validate trained models on held-out data; write reports and model cards."""
    from clinfer.validation.report import validate_all

    try:
        reports = validate_all(
            model_dir, out, cohort_dir=cohort, gates_path=gates, card=model_card
        )
    except (ClinferError, ValueError) as exc:
        _fail(exc)

    table = Table(title="held-out test split")
    for column in (
        "model",
        "version",
        "AUROC (95% CI)",
        "sens",
        "spec",
        "ECE",
        "decision",
    ):
        table.add_column(column)
    for report in reports:
        test = report.data["test"]
        auroc = test["auroc"]
        point = test["operating_point"]
        table.add_row(
            report.model_name,
            report.data["model"]["version"],
            f"{_number(auroc['auroc'])} ({_number(auroc['ci_lower'])}-"
            f"{_number(auroc['ci_upper'])})",
            _number(point["sensitivity"]),
            _number(point["specificity"]),
            _number(test["calibration"]["ece"]),
            report.overall,
        )
    Console().print(table)
    console.print(f"reports written to {out}")
    no_go = [report.model_name for report in reports if report.overall != "GO"]
    if no_go:
        console.print(f"NO-GO: {', '.join(no_go)}")


def register(app: typer.Typer) -> None:
    """Add the ``validate`` command to the clinfer CLI."""
    app.command("validate")(validate_command)
