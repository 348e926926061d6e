"""The ``clinfer query`` command: score one study in real time."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from clinfer.errors import ClinferError

logger = logging.getLogger(__name__)
console = Console(stderr=True)

DEFAULT_URL = "127.0.0.1:8001"


def query_command(
    paths: Annotated[
        list[Path], typer.Argument(help="DICOM files or folders of one study.")
    ],
    emr: Annotated[
        Path | None,
        typer.Option(help="EMR record: a JSON object file or a CSV file row."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON on stdout.")
    ] = False,
    triton_url: Annotated[
        list[str] | None,
        typer.Option(
            help=f"Triton gRPC address HOST:PORT; repeat for failover, tried in "
            f"order. Default {DEFAULT_URL}."
        ),
    ] = None,
    model: Annotated[
        str, typer.Option(help="Model as NAME or NAME:VERSION.")
    ] = "cxr_resnet",
    timeout: Annotated[
        float, typer.Option(help="Per-request deadline in seconds.")
    ] = 30.0,
) -> None:
    """Score one study at the real-time priority and print the result."""
    from clinfer.client.query import Client
    from clinfer.client.triton import parse_model_ref

    try:
        name, version = parse_model_ref(model)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from exc
    urls = triton_url or [DEFAULT_URL]
    try:
        with Client(urls, name, version, timeout_s=timeout) as client:
            result = client.query(paths, emr=emr)
    except ClinferError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=1) from exc

    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    table = Table(
        title=f"{result.model_name}:{result.model_version} on {result.server_url}"
    )
    for column in ("instance file", "frames", "label", "score"):
        table.add_column(column)
    for instance in result.instances:
        table.add_row(
            instance.path,
            str(instance.num_frames),
            instance.label,
            f"{instance.score:.4f}",
        )
    Console().print(table)
    timing = result.timing
    console.print(
        f"study: {result.label} (score {result.score:.4f}, threshold "
        f"{result.threshold}); preprocess {timing.preprocess_ms:.1f} ms, round trip "
        f"{timing.round_trip_ms:.1f} ms, infer "
        f"{'n/a' if timing.infer_ms is None else f'{timing.infer_ms:.1f}'} ms, total "
        f"{timing.total_ms:.1f} ms. {result.emr_note} {result.model_training}"
    )


def register(app: typer.Typer) -> None:
    """Add ``clinfer query`` to the command line."""
    app.command("query")(query_command)
