"""The ``clinfer gateway`` command: serve the HTTP gateway and web page."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from clinfer.errors import ClinferError

logger = logging.getLogger(__name__)

DEFAULT_URL = "127.0.0.1:8001"
DEFAULT_PORT = 8080


def gateway_command(
    tokens: Annotated[
        Path,
        typer.Option(
            help="Tokens file: JSON object of token SHA-256 to "
            '{"user": ..., "scopes": ["query"]}.'
        ),
    ],
    triton_url: Annotated[
        list[str] | None,
        typer.Option(
            help=f"Triton gRPC address HOST:PORT; repeat for failover. Default "
            f"{DEFAULT_URL}."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = DEFAULT_PORT,
    audit_log: Annotated[
        Path, typer.Option(help="Append-only JSON-lines audit log file.")
    ] = Path("results/gateway/audit.jsonl"),
    storage: Annotated[
        Path | None,
        typer.Option(help="Folder that query-by-reference paths are relative to."),
    ] = None,
    model: Annotated[str, typer.Option(help="Model name.")] = "cxr_resnet",
    validation_dir: Annotated[
        Path | None,
        typer.Option(help="Folder of `clinfer validate` reports, one per model."),
    ] = Path("results/validation"),
    state_dir: Annotated[
        Path,
        typer.Option(
            help="Folder of the results database (results.sqlite), which keeps "
            "results across restarts."
        ),
    ] = Path("results/gateway"),
    max_results: Annotated[
        int,
        typer.Option(
            min=1, help="Results kept in the database; the oldest are deleted."
        ),
    ] = 1000,
) -> None:
    """Serve the gateway API and the clinician web page until interrupted."""
    import uvicorn

    from clinfer.gateway.app import GatewaySettings, create_app

    settings = GatewaySettings(
        triton_urls=triton_url or [DEFAULT_URL],
        tokens_file=tokens,
        audit_log=audit_log,
        storage_root=storage,
        model=model,
        validation_dir=validation_dir,
        state_dir=state_dir,
        max_results=max_results,
    )
    try:
        app = create_app(settings)
    except ClinferError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    logger.info("gateway listening on http://%s:%d", host, port)
    # Uvicorn's access log prints query strings and paths, which carry no PHI here
    # because studies travel in request bodies only.
    uvicorn.run(app, host=host, port=port, log_level="info")


def register(app: typer.Typer) -> None:
    """Add the ``gateway`` command to the clinfer CLI."""
    app.command("gateway")(gateway_command)
