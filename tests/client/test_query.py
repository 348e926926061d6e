"""Real-time client against a real embedded Triton server and real DICOM files."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
from clinfer.client import AsyncClient, Client, QueryResult
from clinfer.export.cxr import ExportResult
from clinfer.export.repository import BATCH_PRIORITY, REALTIME_PRIORITY
from clinfer.workers import reasons
from clinfer.workers.preprocess import PreprocessConfig, load_and_preprocess
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from clinfer.cli import app
from clinfer.errors import (
    DicomInputError,
    QueryError,
    ServerUnavailableError,
)
from clinfer.server import EmbeddedTritonServer, free_port

MODEL = "cxr_resnet"


@pytest.fixture(scope="module")
def ct_file() -> Path:
    return Path(get_testdata_file("CT_small.dcm"))


@pytest.fixture(scope="module")
def multiframe_file() -> Path:
    # 10-frame MONOCHROME2 MR instance.
    return Path(get_testdata_file("emri_small.dcm"))


def _expected_scores(exported_model: ExportResult, path: Path) -> np.ndarray:
    onnx_file = exported_model.repository / MODEL / str(exported_model.version)
    session = ort.InferenceSession(
        str(onnx_file / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    frames = load_and_preprocess(path, PreprocessConfig(224, 224)).frames
    (probabilities,) = session.run(None, {"image": frames})
    return probabilities[:, 1]


def _dead_url() -> str:
    return f"127.0.0.1:{free_port()}"


def test_sync_matches_onnx_runtime(
    triton_server: EmbeddedTritonServer, exported_model: ExportResult, ct_file: Path
) -> None:
    with Client(triton_server.grpc_url) as client:
        result = client.query(ct_file)
    expected = _expected_scores(exported_model, ct_file)
    assert result.instances[0].frame_scores == pytest.approx(expected, abs=1e-5)


def test_async_matches_onnx_runtime(
    triton_server: EmbeddedTritonServer, exported_model: ExportResult, ct_file: Path
) -> None:
    async def run() -> QueryResult:
        async with AsyncClient([triton_server.grpc_url]) as client:
            return await client.query(ct_file)

    result = asyncio.run(run())
    expected = _expected_scores(exported_model, ct_file)
    assert result.instances[0].frame_scores == pytest.approx(expected, abs=1e-5)


def test_multiframe_score_is_max(
    triton_server: EmbeddedTritonServer,
    exported_model: ExportResult,
    multiframe_file: Path,
) -> None:
    with Client(triton_server.grpc_url) as client:
        result = client.query([multiframe_file])
    expected = _expected_scores(exported_model, multiframe_file)
    assert result.instances[0].num_frames == expected.shape[0]
    assert result.score == pytest.approx(float(expected.max()), abs=1e-5)


def test_result_names_model(
    triton_server: EmbeddedTritonServer, exported_model: ExportResult, ct_file: Path
) -> None:
    with Client(triton_server.grpc_url) as client:
        result = client.query(ct_file)
    assert result.model_name == MODEL
    assert result.model_version == str(exported_model.version)
    assert len(result.model_sha256) == 64
    assert result.threshold == 0.5
    assert result.label in ("normal", "abnormal")
    assert result.priority == 1
    assert result.saliency is None
    assert result.triton_model == "cxr_resnet_realtime"
    assert "UNTRAINED" in result.model_training


def test_timing_breakdown(triton_server: EmbeddedTritonServer, ct_file: Path) -> None:
    with Client(triton_server.grpc_url) as client:
        timing = client.query(ct_file).timing
    assert timing.infer_ms is not None
    assert timing.infer_ms > 0
    assert timing.queue_ms is not None
    assert timing.queue_ms >= 0
    assert timing.round_trip_ms >= timing.infer_ms
    assert timing.total_ms >= timing.round_trip_ms + timing.preprocess_ms


def test_folder_skips_non_dicom(
    triton_server: EmbeddedTritonServer, ct_file: Path, tmp_path: Path
) -> None:
    shutil.copy(ct_file, tmp_path / "image.dcm")
    (tmp_path / "notes.txt").write_text("not an image")
    with Client(triton_server.grpc_url) as client:
        result = client.query(tmp_path)
    assert len(result.instances) == 1
    assert [s.reason for s in result.skipped] == [reasons.NON_DICOM_FILE]


def test_emr_not_used(triton_server: EmbeddedTritonServer, ct_file: Path) -> None:
    with Client(triton_server.grpc_url) as client:
        result = client.query(ct_file, emr={"age": 61, "smoking": "former"})
    assert result.emr_used is False
    assert "EMR not used by this model" in result.emr_note


def test_emr_csv_single_row(
    triton_server: EmbeddedTritonServer, ct_file: Path, tmp_path: Path
) -> None:
    emr = tmp_path / "emr.csv"
    emr.write_text("age,smoking\n61,former\n")
    with Client(triton_server.grpc_url) as client:
        result = client.query(ct_file, emr=emr)
    assert "EMR not used by this model" in result.emr_note


def test_emr_bad_suffix_rejected(
    triton_server: EmbeddedTritonServer, ct_file: Path, tmp_path: Path
) -> None:
    emr = tmp_path / "emr.xml"
    emr.write_text("<record/>")
    with Client(triton_server.grpc_url) as client:
        with pytest.raises(QueryError, match="emr.xml"):
            client.query(ct_file, emr=emr)


def test_failover_to_second_url(
    triton_server: EmbeddedTritonServer, ct_file: Path
) -> None:
    with Client([_dead_url(), triton_server.grpc_url], timeout_s=5.0) as client:
        result = client.query(ct_file)
    assert result.server_url == triton_server.grpc_url


def test_async_failover(triton_server: EmbeddedTritonServer, ct_file: Path) -> None:
    async def run() -> QueryResult:
        urls = [_dead_url(), triton_server.grpc_url]
        async with AsyncClient(urls, timeout_s=5.0) as client:
            return await client.query(ct_file)

    assert asyncio.run(run()).server_url == triton_server.grpc_url


def test_unreachable_server_typed(ct_file: Path) -> None:
    with Client([_dead_url(), _dead_url()], timeout_s=5.0) as client:
        with pytest.raises(ServerUnavailableError, match="no Triton server"):
            client.query(ct_file)


def test_unknown_model_typed(
    triton_server: EmbeddedTritonServer, ct_file: Path
) -> None:
    with Client(triton_server.grpc_url, "no_such_model") as client:
        with pytest.raises(QueryError, match="no_such_model"):
            client.query(ct_file)


def test_bad_dicom_names_file(
    triton_server: EmbeddedTritonServer, ct_file: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(ct_file.read_bytes()[:-1000])
    with Client(triton_server.grpc_url) as client:
        with pytest.raises(DicomInputError, match="broken.dcm") as info:
            client.query(broken)
    assert info.value.reason == reasons.TRUNCATED


def test_two_studies_rejected(
    triton_server: EmbeddedTritonServer, ct_file: Path, multiframe_file: Path
) -> None:
    with Client(triton_server.grpc_url) as client:
        with pytest.raises(QueryError, match="2 studies"):
            client.query([ct_file, multiframe_file])


def test_realtime_overtakes_batch_queue(triton_server: EmbeddedTritonServer) -> None:
    # Twenty-four 16-frame batch requests fill about twelve executions of the single
    # model instance. The real-time request is sent once the first one has completed, so
    # the rest are queued; at priority 1 it joins the next execution.
    total = 24
    order: list[str] = []
    lock = threading.Lock()
    first_done = threading.Event()
    all_done = threading.Event()
    batch = triton_grpc.InferenceServerClient(triton_server.grpc_url)
    images = np.zeros((16, 1, 224, 224), dtype=np.float32)
    tensor = triton_grpc.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)

    def done(result: object, error: object) -> None:
        with lock:
            order.append("batch" if error is None else "batch_error")
            count = len([item for item in order if item.startswith("batch")])
        first_done.set()
        if count == total:
            all_done.set()

    try:
        for _ in range(total):
            batch.async_infer(MODEL, [tensor], done, priority=BATCH_PRIORITY)
        assert first_done.wait(timeout=300)
        # Sent to the batch model itself, so the order shows its priority queue and
        # not a separate real-time instance.
        single = triton_grpc.InferInput("image", [1, 1, 224, 224], "FP32")
        single.set_data_from_numpy(images[:1])
        batch.infer(MODEL, [single], priority=REALTIME_PRIORITY)
        with lock:
            order.append("realtime")
        assert all_done.wait(timeout=300)
    finally:
        batch.close()

    before = order.index("realtime")
    assert "batch_error" not in order
    assert before < total // 2


def test_query_json_cli(
    triton_server: EmbeddedTritonServer, exported_model: ExportResult, ct_file: Path
) -> None:
    result = CliRunner().invoke(
        app,
        ["query", str(ct_file), "--json", "--triton-url", triton_server.grpc_url],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model_version"] == str(exported_model.version)
    assert data["model_name"] == MODEL


def test_query_cli_unreachable_exits(ct_file: Path) -> None:
    result = CliRunner().invoke(
        app, ["query", str(ct_file), "--triton-url", _dead_url(), "--timeout", "5"]
    )
    assert result.exit_code == 1
