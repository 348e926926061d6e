"""The clinfer command line on real files: summary, Ray cluster address, no PHI in logs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import pytest

from clinfer.corpus import find_test_file
from clinfer.server import EmbeddedTritonServer, free_port

BIN = Path(sys.executable).parent
CLINFER = str(BIN / "clinfer")
PHI_FILES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "emri_small.dcm",
    "JPEG2000.dcm",
    "rtplan.dcm",
]
# `ray start` clusters use token authentication (Ray 2.60); the driver needs the same
# mode to send the token that `ray start` saved in ~/.ray/auth_token.
RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "token"}
PHI_KEYWORDS = ["PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs"]


@pytest.fixture()
def phi_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "studies"
    folder.mkdir()
    for name in PHI_FILES:
        shutil.copy(find_test_file(name), folder / name)
    return folder


def _phi_values(folder: Path) -> set[str]:
    values = set()
    for path in folder.iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in PHI_KEYWORDS:
            value = str(ds.get(keyword, "") or "")
            # Very short values ("1", "M") would match unrelated log text.
            if len(value) >= 4:
                values.add(value)
    return values


def test_score_logs_no_phi(
    phi_folder: Path, triton_server: EmbeddedTritonServer, tmp_path: Path
) -> None:
    result = subprocess.run(
        [
            CLINFER,
            "--verbose",
            "score",
            str(phi_folder),
            "--out",
            str(tmp_path / "out"),
            "--triton-url",
            triton_server.grpc_url,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    phi = _phi_values(phi_folder)
    assert len(phi) >= 3
    logs = result.stdout + result.stderr
    for value in phi:
        assert value not in logs


def test_score_prints_summary(
    phi_folder: Path, triton_server: EmbeddedTritonServer, tmp_path: Path
) -> None:
    result = subprocess.run(
        [
            CLINFER,
            "score",
            str(phi_folder),
            "--out",
            str(tmp_path / "out"),
            "--triton-url",
            triton_server.grpc_url,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "instances scored in this run" in result.stdout
    assert "skipped: non_image_object" in result.stdout
    assert "throughput (instances/s)" in result.stdout
    assert "UNTRAINED" in result.stdout


def test_score_embedded_server_by_default(
    phi_folder: Path, model_repository: Path, tmp_path: Path
) -> None:
    result = subprocess.run(
        [
            CLINFER,
            "score",
            str(phi_folder),
            "--out",
            str(tmp_path / "out"),
            "--repository",
            str(model_repository),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "tritonserver stopped" in result.stderr
    assert (tmp_path / "out" / "tritonserver.log").stat().st_size > 0


def test_score_rejects_bad_model_ref(phi_folder: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            CLINFER,
            "score",
            str(phi_folder),
            "--out",
            str(tmp_path),
            "--model",
            "cxr:one",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "NAME:VERSION" in result.stderr


def test_score_joins_ray_cluster(
    phi_folder: Path, triton_server: EmbeddedTritonServer, tmp_path: Path
) -> None:
    port = free_port()
    # A temp dir of its own keeps this cluster's address file out of /tmp/ray; it
    # must be short because Ray puts Unix sockets in it.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--node-ip-address=127.0.0.1",
            "--block",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**RAY_ENV, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    try:
        time.sleep(1)
        deadline = time.monotonic() + 120
        result = None
        while time.monotonic() < deadline:
            result = subprocess.run(
                [
                    CLINFER,
                    "score",
                    str(phi_folder),
                    "--out",
                    str(tmp_path / "out"),
                    "--triton-url",
                    triton_server.grpc_url,
                    "--ray-address",
                    f"127.0.0.1:{port}",
                ],
                capture_output=True,
                text=True,
                timeout=600,
                env=RAY_ENV,
            )
            if result.returncode == 0 or "connect" not in result.stderr.lower():
                break
            time.sleep(2)
        assert result is not None
        assert result.returncode == 0, result.stderr
        assert f"connected to Ray at 127.0.0.1:{port}" in result.stderr
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_score_batch_default_is_job_default() -> None:
    from dataclasses import fields

    from clinfer.workers.pipeline import JobOptions

    from clinfer.cli import DEFAULT_BATCH_SIZE

    defaults = {f.name: f.default for f in fields(JobOptions)}
    assert DEFAULT_BATCH_SIZE == defaults["batch_size"]
