"""`clinfer up` as a child process: Triton, metrics endpoint, Prometheus, clean stop."""

from __future__ import annotations

import json
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from clinfer.server import free_port

CLINFER = str(Path(sys.executable).parent / "clinfer")
READY_TIMEOUT_S = 180.0
WAIT_S = 60.0


@dataclass
class UpProcess:
    process: subprocess.Popen[str]
    urls: dict[str, str]
    gateway_address: str
    workdir: Path


def _read_ready_line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        if selector.select(timeout=1.0):
            line = process.stdout.readline()
            if line.startswith("ready "):
                return line
    raise AssertionError(
        f"clinfer up printed no ready line (exit code {process.poll()})"
    )


@pytest.fixture(scope="module")
def up(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[UpProcess]:
    workdir = tmp_path_factory.mktemp("up")
    gateway = f"127.0.0.1:{free_port()}"
    command = [
        CLINFER, "up", "--repository", str(model_repository), "--workdir", str(workdir),
        "--prometheus-port", "0", "--http-port", "0", "--grpc-port", "0",
        "--triton-metrics-port", "0", "--worker-metrics-port", "0",
        "--job-metrics-port", str(free_port()), "--scrape-interval", "0.5",
        "--target", f"gateway={gateway}", "--gateway-port", "0",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=open(workdir / "up.log", "w"), text=True
    )
    try:
        line = _read_ready_line(process)
        urls = dict(item.split("=", 1) for item in line.split()[1:])
        yield UpProcess(process, urls, gateway, workdir)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def _targets(up: UpProcess) -> dict[str, str]:
    """Return the health of each scrape job once Triton and the worker are up."""
    url = f"{up.urls['prometheus']}/api/v1/targets"
    deadline = time.monotonic() + WAIT_S
    health: dict[str, str] = {}
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=10.0) as response:
            active = json.load(response)["data"]["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in active}
        if health.get("triton") == "up" and health.get("clinfer_worker") == "up":
            break
        time.sleep(0.5)
    return health


def _port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(2.0)
        return sock.connect_ex((host, int(port))) == 0


def test_up_prints_every_url(up: UpProcess) -> None:
    keys = ("prometheus", "grpc", "http", "triton_metrics", "worker_metrics", "gateway")
    for key in keys:
        assert key in up.urls, key


def test_up_scrapes_triton_and_worker(up: UpProcess) -> None:
    health = _targets(up)
    assert health.get("triton") == "up"
    assert health.get("clinfer_worker") == "up"


def test_up_lists_extra_and_job_targets(up: UpProcess) -> None:
    health = _targets(up)
    # Nothing listens on these ports, but Prometheus scrapes them.
    assert "gateway" in health
    assert "clinfer_job" in health


def _query_gateway(up: UpProcess) -> int:
    token = (up.workdir / "gateway" / "token").read_text(encoding="utf-8").strip()
    boundary = "clinferboundary"
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="ct.dcm"\r\nContent-Type: application/dicom\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{up.urls['gateway']}/v1/studies/query",
        data=body,
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
    )
    with urllib.request.urlopen(request, timeout=60.0) as response:
        return response.status


def _series(up: UpProcess, expression: str) -> list[dict]:
    url = f"{up.urls['prometheus']}/api/v1/query?" + urllib.parse.urlencode(
        {"query": expression}
    )
    deadline = time.monotonic() + WAIT_S
    result: list[dict] = []
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=10.0) as response:
            result = json.load(response)["data"]["result"]
        if result:
            break
        time.sleep(0.5)
    return result


def test_up_scrapes_gateway_queries(up: UpProcess) -> None:
    for _ in range(3):
        assert _query_gateway(up) == 200
    query = (
        'clinfer_gateway_request_seconds_count{job="clinfer_gateway",'
        'route="/v1/studies/query",priority="realtime",outcome="ok"} >= 3'
    )
    latency = _series(up, query)
    assert len(latency) == 1
    codes = _series(
        up, 'clinfer_gateway_responses_total{job="clinfer_gateway",code="200"}'
    )
    assert codes
    client = _series(
        up,
        'clinfer_client_query_seconds_count{job="clinfer_gateway",outcome="ok"} >= 3',
    )
    assert len(client) == 1


def test_up_stops_on_sigterm(up: UpProcess) -> None:
    prometheus = up.urls["prometheus"].removeprefix("http://")
    grpc = up.urls["grpc"]
    assert _port_open(prometheus)
    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(timeout=90) == 0
    assert not _port_open(prometheus)
    assert not _port_open(grpc)
