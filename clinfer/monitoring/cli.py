"""The ``clinfer up`` command: Triton, the gateway, metrics and Prometheus on loopback."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from clinfer.errors import ClinferError
from clinfer.gateway.cli import DEFAULT_PORT as DEFAULT_GATEWAY_PORT
from clinfer.metrics import DEFAULT_JOB_METRICS_PORT, DEFAULT_WORKER_METRICS_PORT
from clinfer.monitoring.prometheus import DEFAULT_PROMETHEUS_PORT, ScrapeTarget
from clinfer.server import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT

logger = logging.getLogger(__name__)
console = Console(stderr=True)


def up(
    repository: Annotated[Path, typer.Option(help="Model repository to serve.")] = Path(
        "model_repository"
    ),
    workdir: Annotated[
        Path,
        typer.Option(help="Folder for logs, the Prometheus config and its storage."),
    ] = Path("results/monitoring"),
    prometheus_port: Annotated[
        int, typer.Option(help="Prometheus web and API port (0: any free port).")
    ] = DEFAULT_PROMETHEUS_PORT,
    http_port: Annotated[
        int, typer.Option(help="Triton HTTP port (0: any free port).")
    ] = DEFAULT_HTTP_PORT,
    grpc_port: Annotated[
        int, typer.Option(help="Triton gRPC port (0: any free port).")
    ] = DEFAULT_GRPC_PORT,
    triton_metrics_port: Annotated[
        int, typer.Option(help="Triton metrics port (0: any free port).")
    ] = DEFAULT_METRICS_PORT,
    worker_metrics_port: Annotated[
        int,
        typer.Option(help="Port of this process's GPU metrics (0: any free port)."),
    ] = DEFAULT_WORKER_METRICS_PORT,
    job_metrics_port: Annotated[
        int,
        typer.Option(help="Port that scoring jobs serve metrics on, to scrape."),
    ] = DEFAULT_JOB_METRICS_PORT,
    target: Annotated[
        list[str] | None,
        typer.Option(help="Extra scrape target JOB=HOST:PORT[,HOST:PORT]; repeatable."),
    ] = None,
    scrape_interval: Annotated[
        float, typer.Option(help="Prometheus scrape interval in seconds.")
    ] = 5.0,
    gateway_port: Annotated[
        int,
        typer.Option(
            help="Gateway web page, API and /metrics port (0: any free port)."
        ),
    ] = DEFAULT_GATEWAY_PORT,
    gateway_tokens: Annotated[
        Path | None,
        typer.Option(
            help="Tokens file of the gateway (see `clinfer gateway --help`). Default: "
            "a new token in WORKDIR/gateway/token."
        ),
    ] = None,
    gateway_model: Annotated[
        str, typer.Option(help="Model that the gateway queries.")
    ] = "cxr_resnet",
    validation_dir: Annotated[
        Path | None,
        typer.Option(help="Folder of `clinfer validate` reports, one per model."),
    ] = Path("results/validation"),
    no_gateway: Annotated[
        bool, typer.Option("--no-gateway", help="Start no gateway.")
    ] = False,
) -> None:
    """Start Triton, the gateway, a metrics endpoint and Prometheus until a signal.

    SIGINT or SIGTERM stops every part.
    """
    from clinfer.monitoring.stack import MonitoringStack

    try:
        extra = [ScrapeTarget.parse(text) for text in target or []]
    except ClinferError as exc:
        raise typer.BadParameter(str(exc), param_hint="--target") from exc
    stack = MonitoringStack(
        repository,
        workdir,
        prometheus_port=prometheus_port,
        triton_http_port=http_port,
        triton_grpc_port=grpc_port,
        triton_metrics_port=triton_metrics_port,
        worker_metrics_port=worker_metrics_port,
        job_metrics_port=job_metrics_port,
        extra_targets=extra,
        scrape_interval_s=scrape_interval,
        gateway_port=None if no_gateway else gateway_port,
        gateway_tokens=gateway_tokens,
        gateway_model=gateway_model,
        validation_dir=validation_dir,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        stack.start()
    except ClinferError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    assert stack.triton and stack.metrics and stack.prometheus
    gateway = f" gateway={stack.gateway.url}" if stack.gateway is not None else ""
    # One machine-readable line, as `clinfer serve` prints.
    print(
        f"ready prometheus={stack.prometheus.url} grpc={stack.triton.grpc_url} "
        f"http={stack.triton.http_url} triton_metrics={stack.triton.metrics_url} "
        f"worker_metrics={stack.metrics.url}{gateway}",
        flush=True,
    )
    console.print(
        f"Prometheus targets: {stack.prometheus.url}/targets; scoring jobs started "
        f"with metrics port {job_metrics_port} are scraped while they run."
    )
    try:
        while not stop.wait(0.5):
            stack.check_running()
    except ClinferError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    finally:
        stack.stop()
    console.print("stopped prometheus, metrics endpoint, gateway and tritonserver")


def register(app: typer.Typer) -> None:
    """Add ``clinfer up`` to the CLI."""
    app.command()(up)
