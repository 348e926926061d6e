"""The ``clinfer bench`` commands."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from clinfer.errors import ClinferError

logger = logging.getLogger(__name__)
console = Console()

bench_app = typer.Typer(help="Benchmarks.", no_args_is_help=True)


def _row(summary: dict[str, Any]) -> list[str]:
    def fmt(value: Any, digits: int = 1) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    return [
        summary["design"],
        fmt(summary["idle_p50_ms"]),
        fmt(summary["idle_p99_ms"]),
        fmt(summary["loaded_p50_ms"]),
        fmt(summary["loaded_p99_ms"]),
        fmt(summary["p99_ratio"], 2),
        fmt(summary["batch_alone_fps"]),
        fmt(summary["batch_kept_ratio"], 2),
    ]


@bench_app.command("realtime")
def realtime_command(
    out: Annotated[Path, typer.Option(help="JSON file to write.")] = Path(
        "results/bench/realtime.json"
    ),
    design: Annotated[
        list[str] | None,
        typer.Option(help="Design to measure; repeat for several. Default: all."),
    ] = None,
    batch_clients: Annotated[
        int, typer.Option(help="Batch client threads sending at priority 2.")
    ] = 6,
    batch_size: Annotated[int, typer.Option(help="Frames per batch request.")] = 32,
    requests: Annotated[
        int, typer.Option(help="Real-time requests per phase and repeat.")
    ] = 60,
    gap_ms: Annotated[
        float, typer.Option(help="Pause after each real-time response, in ms.")
    ] = 100.0,
    phase_s: Annotated[
        float, typer.Option(help="Seconds of the batch-alone phase.")
    ] = 6.0,
    repeats: Annotated[int, typer.Option(help="Interleaved repeats.")] = 3,
    tiny: Annotated[
        bool, typer.Option(help="Run in seconds with minimal load (smoke test).")
    ] = False,
) -> None:
    """Measure real-time latency idle and under batch load for serving designs."""
    from clinfer.bench.realtime import DESIGNS, BenchConfig, run_bench, tiny_config

    designs = tuple(design or DESIGNS)
    if tiny:
        config = tiny_config(designs)
    else:
        config = replace(
            BenchConfig(),
            designs=designs,
            batch_clients=batch_clients,
            batch_size=batch_size,
            realtime_requests=requests,
            realtime_gap_s=gap_ms / 1000.0,
            batch_phase_s=phase_s,
            repeats=repeats,
        )
    table = Table(title="real-time latency (ms) and batch throughput (frames/s)")
    for column in (
        "design",
        "idle p50",
        "idle p99",
        "loaded p50",
        "loaded p99",
        "p99 ratio",
        "batch fps",
        "batch kept",
    ):
        table.add_column(column)

    def report(summary: dict[str, Any]) -> None:
        console.print(" ".join(_row(summary)))

    try:
        summaries = run_bench(config, out, report=report)
    except ClinferError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=1) from exc
    for summary in summaries:
        table.add_row(*_row(summary))
    console.print(table)
    console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add ``clinfer bench`` to the command line."""
    app.add_typer(bench_app, name="bench")
