"""Embedded Triton server: readiness, inference, `clinfer serve` start and shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clinfer.client.triton import TritonModelClient
from clinfer.export.repository import REALTIME_PRIORITY

from clinfer.errors import InferenceError
from clinfer.server import EmbeddedTritonServer

CLINFER = str(Path(sys.executable).with_name("clinfer"))


def test_server_serves_model_spec(triton_server: EmbeddedTritonServer) -> None:
    client = TritonModelClient(triton_server.grpc_url, "cxr_resnet")
    spec = client.fetch_spec()
    client.close()
    assert spec.version == "1"
    assert spec.labels == ("normal", "abnormal")
    assert len(spec.sha256) == 64


def test_server_infers_probabilities(triton_server: EmbeddedTritonServer) -> None:
    client = TritonModelClient(triton_server.grpc_url, "cxr_resnet")
    spec = client.fetch_spec()
    images = np.random.default_rng().random((5, 1, spec.height, spec.width), np.float32)
    probabilities = client.infer(images, spec, priority=REALTIME_PRIORITY)
    client.close()
    assert probabilities.shape == (5, 2)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_server_rejects_wrong_shape(triton_server: EmbeddedTritonServer) -> None:
    client = TritonModelClient(triton_server.grpc_url, "cxr_resnet")
    spec = client.fetch_spec()
    images = np.zeros((2, 1, 10, 10), np.float32)
    with pytest.raises(InferenceError, match="failed a batch of 2"):
        client.infer(images, spec, priority=REALTIME_PRIORITY)
    client.close()


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"]
)
def test_serve_command_stops_cleanly(
    model_repository: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    log_file = tmp_path / "server.log"
    process = subprocess.Popen(
        [
            CLINFER,
            "serve",
            "--repository",
            str(model_repository),
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            "--log-file",
            str(log_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("ready "), process.stderr.read() if process.stderr else ""
    fields = dict(item.split("=", 1) for item in line.split()[1:])
    grpc_port = int(fields["grpc"].rsplit(":", 1)[1])

    client = TritonModelClient(fields["grpc"], "cxr_resnet")
    assert client.fetch_spec().name == "cxr_resnet"
    client.close()

    process.send_signal(signum)
    assert process.wait(timeout=60) == 0
    assert not _port_open(grpc_port)
    assert log_file.stat().st_size > 0


def test_serve_reports_missing_repository(tmp_path: Path) -> None:
    result = subprocess.run(
        [CLINFER, "serve", "--repository", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "clinfer export" in result.stderr


def test_server_start_failure_quotes_log(tmp_path: Path) -> None:
    broken = tmp_path / "repo" / "broken" / "1"
    broken.mkdir(parents=True)
    (broken.parent / "config.pbtxt").write_text('backend: "no_such_backend"\n')
    server = EmbeddedTritonServer(
        tmp_path / "repo",
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        log_file=tmp_path / "log.txt",
    )
    with pytest.raises(Exception, match="exited with code"):
        server.start(timeout_s=60)
    assert server.process is None
    assert os.path.exists(tmp_path / "log.txt")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_server_stops_when_parent_killed(model_repository: Path, tmp_path: Path) -> None:
    import time

    process = subprocess.Popen(
        [CLINFER, "serve", "--repository", str(model_repository), "--http-port", "0",
         "--grpc-port", "0", "--metrics-port", "0", "--log-file", str(tmp_path / "log")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().startswith("ready ")
    servers = _children(process.pid)
    assert servers
    process.kill()
    process.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in servers):
        assert time.monotonic() < deadline, "tritonserver outlived its killed parent"
        time.sleep(0.2)
