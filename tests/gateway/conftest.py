"""Gateway fixtures: tokens, settings on the real Triton server, clients, chromium."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient
from playwright import sync_api as playwright_api
from pydicom.data import get_testdata_file

from clinfer.gateway.app import GatewaySettings, create_app
from clinfer.gateway.auth import hash_token
from clinfer.server import EmbeddedTritonServer

QUERY_TOKEN = "query-token-alice"
READ_TOKEN = "read-only-token-bob"

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def page(tmp_path: Path) -> Iterator[object]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} not found; install Debian's chromium package")
    with playwright_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
        )
        try:
            yield context.new_page()
        finally:
            context.close()


@pytest.fixture
def gateway_dir(tmp_path: Path) -> Path:
    tokens = {
        hash_token(QUERY_TOKEN): {"user": "alice", "scopes": ["query"]},
        hash_token(READ_TOKEN): {"user": "bob", "scopes": ["read"]},
    }
    (tmp_path / "tokens.json").write_text(json.dumps(tokens), encoding="utf-8")
    storage = tmp_path / "storage"
    (storage / "study1").mkdir(parents=True)
    ct = Path(get_testdata_file("CT_small.dcm"))
    (storage / "study1" / "ct.dcm").write_bytes(ct.read_bytes())
    return tmp_path


@pytest.fixture
def settings(gateway_dir: Path, triton_server: EmbeddedTritonServer) -> GatewaySettings:
    return GatewaySettings(
        triton_urls=[triton_server.grpc_url],
        tokens_file=gateway_dir / "tokens.json",
        audit_log=gateway_dir / "audit.jsonl",
        storage_root=gateway_dir / "storage",
        max_request_bytes=2 * 1024 * 1024,
        max_files=4,
    )


@pytest.fixture
def client(settings: GatewaySettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def live_gateway(settings: GatewaySettings) -> Iterator[str]:
    port = _free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30.0
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10.0)
