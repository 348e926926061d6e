"""Typer command ``clinfer export-trained``: export and publish the trained models."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from clinfer.export.onnx_export import DEFAULT_TOLERANCE
from rich.console import Console
from rich.table import Table

from clinfer.errors import ClinferError

logger = logging.getLogger(__name__)
console = Console(stderr=True)


def _fail(exc: BaseException) -> NoReturn:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(2)


def _diffs(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.2g}" for name, value in values.items())


def report_table(rows: list[dict[str, Any]]) -> Table:
    """Return a table of the per-model rows of ``ExportReport.rows``."""
    table = Table(title="exported models")
    for column in ("model", "version", "random max abs diff", "real max abs diff"):
        table.add_column(column)
    table.add_column("TensorRT")
    for row in rows:
        version = f"{row['version']}{'' if row['created'] else ' (unchanged)'}"
        trt = row["tensorrt"]
        if row["tensorrt_reason"]:
            trt = f"{trt}: {row['tensorrt_reason']}"
        elif row["tensorrt_max_abs_diff"] is not None:
            trt = (
                f"{trt}: max abs diff {row['tensorrt_max_abs_diff']:.2g}, AUROC delta "
                f"{row['tensorrt_auroc_delta']}"
            )
        table.add_row(
            row["model"],
            version,
            _diffs(row["random_max_abs_diff"]),
            _diffs(row["real_max_abs_diff"]),
            trt,
        )
    return table


def export_trained_command(
    models: Annotated[
        Path, typer.Option("--models", help="Output folder of `clinfer train`.")
    ],
    cohort: Annotated[
        Path,
        typer.Option(
            "--cohort",
            help="Cohort the models were trained on; its test split feeds the "
            "real-input parity gates.",
        ),
    ],
    repository: Annotated[
        Path, typer.Option("--repository", help="Triton model repository to write.")
    ] = Path("model_repository"),
    tolerance: Annotated[
        float,
        typer.Option(
            "--tolerance",
            min=0.0,
            help="Maximum absolute fp32 difference of the probabilities between "
            "ONNX Runtime and PyTorch.",
        ),
    ] = DEFAULT_TOLERANCE,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help="Seed of the random-input gate (default: fresh)."),
    ] = None,
    tensorrt: Annotated[
        bool,
        typer.Option(
            "--tensorrt/--no-tensorrt",
            help="Build TensorRT fp16 engines where TensorRT and a GPU are present.",
        ),
    ] = True,
    report: Annotated[
        Path | None,
        typer.Option("--report", help="Also write the per-model results as JSON."),
    ] = None,
    validation_dir: Annotated[
        Path | None,
        typer.Option(
            "--validation-dir",
            help="Output folder of `clinfer validate`: serve each model at its "
            "report's operating threshold instead of 0.5.",
        ),
    ] = None,
    realtime_copies: Annotated[
        bool,
        typer.Option(
            "--realtime-copies/--no-realtime-copies",
            help="Also publish <name>_realtime copies of the composition and the "
            "models it calls, on their own instances, for priority-1 queries.",
        ),
    ] = True,
) -> None:
    """Export the trained models to ONNX with parity gates and publish them.

    Publishes cxr_cnn (probabilities and saliency), emr_mlp, fusion,
    breast_cancer_logistic and the composition multimodal, and by default the
    real-time copies cxr_cnn_realtime, emr_mlp_realtime, fusion_realtime and
    multimodal_realtime.
    """
    from clinfer.export.multimodal import export_trained_models
    from clinfer.export.served_repository import ServingOptions

    logging.getLogger("openjpeg").setLevel(logging.WARNING)
    try:
        result = export_trained_models(
            models,
            cohort,
            repository,
            tolerance=tolerance,
            seed=seed,
            tensorrt=tensorrt,
            options=ServingOptions(realtime_models=realtime_copies),
            validation_dir=validation_dir,
        )
    except ClinferError as exc:
        _fail(exc)
    rows = result.rows()
    console.print(report_table(rows))
    console.print(
        f"composition multimodal version {result.composition_version}"
        f"{'' if result.composition_created else ' (unchanged)'} in {repository}"
    )
    if result.realtime_copies:
        console.print(
            "real-time copies at the same versions: "
            + ", ".join(result.realtime_copies)
        )
    if report is not None:
        report.write_text(json.dumps(rows, indent=2), encoding="utf-8")


def register(app: typer.Typer) -> None:
    """Add ``export-trained`` to the clinfer CLI."""
    app.command("export-trained")(export_trained_command)
