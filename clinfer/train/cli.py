"""Typer commands ``clinfer cohort`` and ``clinfer train``."""

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


def _quiet_encoders() -> None:
    # pylibjpeg-openjpeg logs one INFO line per encoded tile.
    logging.getLogger("openjpeg").setLevel(logging.WARNING)


def cohort_command(
    n: Annotated[int, typer.Option("--n", min=1, help="Number of patients.")],
    out: Annotated[
        Path, typer.Option("--out", help="Cohort folder to create (missing or empty).")
    ],
    seed: Annotated[
        int,
        typer.Option("--seed", min=0, help="Seed; the same seed gives the same files."),
    ] = 0,
) -> None:
    """Write a synthetic chest-radiograph + EMR cohort (DICOM, CSV, FHIR, manifest)."""
    from clinfer.train.cohort import generate_cohort

    _quiet_encoders()
    try:
        manifest = generate_cohort(n, out, seed=seed)
    except (ClinferError, ValueError) as exc:
        _fail(exc)
    positives = sum(patient.label for patient in manifest.patients)
    syntaxes = len({patient.transfer_syntax_uid for patient in manifest.patients})
    console.print(
        f"{manifest.n} synthetic patients ({positives} with label 1) written to {out} "
        f"in {syntaxes} transfer syntaxes; manifest: {out / 'manifest.json'}"
    )


def train_command(
    cohort: Annotated[
        Path, typer.Option("--cohort", help="Cohort folder from `clinfer cohort`.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder for the models.")],
    seed: Annotated[
        int,
        typer.Option("--seed", min=0, help="Seed of initialisation and batch order."),
    ] = 0,
    num_threads: Annotated[
        int,
        typer.Option(
            "--num-threads", min=1, help="CPU threads; weights depend on this value."
        ),
    ] = 1,
) -> None:
    """Train the image, EMR, fusion and breast-cancer models and save them to OUT."""
    from clinfer.train.training import TrainConfig, train_all

    try:
        report = train_all(
            cohort, out, seed=seed, config=TrainConfig(num_threads=num_threads)
        )
    except (ClinferError, ValueError) as exc:
        _fail(exc)

    table = Table(title=f"held-out test metrics (seed {seed})")
    for column in ("model", "AUROC", "accuracy", "n", "positives", "folder"):
        table.add_column(column)
    for name, model in report.models.items():
        test = model.test_metrics
        auroc = "n/a" if test["auroc"] is None else f"{test['auroc']:.3f}"
        table.add_row(
            name,
            auroc,
            f"{test['accuracy']:.3f}",
            str(test["n"]),
            str(test["positives"]),
            str(model.directory),
        )
    Console().print(table)
    console.print(f"trained {len(report.models)} models in {report.wall_s:.1f} s")


def register(app: typer.Typer) -> None:
    """Add the ``cohort`` and ``train`` commands to the clinfer CLI."""
    app.command("cohort")(cohort_command)
    app.command("train")(train_command)
