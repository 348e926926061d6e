"""Queries routed to the dedicated real-time model that shares the batch model's ONNX."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from clinfer.client import Client
from clinfer.export.cxr import export_cxr_model
from clinfer.export.repository import (
    BATCH_PRIORITY,
    TritonConfigOptions,
    sha256_file,
)
from pydicom.data import get_testdata_file

from clinfer.server import EmbeddedTritonServer

OPTIONS = TritonConfigOptions(realtime_model=True, process_nice=19, intra_op_threads=1)


@pytest.fixture(scope="module")
def twin_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("twin_repository")
    export_cxr_model(repository, options=OPTIONS)
    return repository


@pytest.fixture(scope="module")
def twin_server(
    twin_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedTritonServer]:
    log = tmp_path_factory.mktemp("twin_triton") / "tritonserver.log"
    server = EmbeddedTritonServer(
        twin_repository, http_port=0, grpc_port=0, metrics_port=0, log_file=log
    )
    server.start()
    yield server
    server.stop()


def test_twin_shares_onnx_bytes(twin_repository: Path) -> None:
    batch = twin_repository / "cxr_resnet" / "1" / "model.onnx"
    realtime = twin_repository / "cxr_resnet_realtime" / "1" / "model.onnx"
    assert sha256_file(realtime) == sha256_file(batch)


def test_twin_config_not_niced(twin_repository: Path) -> None:
    batch = (twin_repository / "cxr_resnet" / "config.pbtxt").read_text()
    realtime = (twin_repository / "cxr_resnet_realtime" / "config.pbtxt").read_text()
    assert 'string_value: "19"' in batch
    assert 'key: "clinfer_realtime_model"' in batch
    assert 'key: "clinfer_realtime_model"' not in realtime
    assert 'string_value: "19"' not in realtime


def test_realtime_query_uses_twin(twin_server: EmbeddedTritonServer) -> None:
    ct = get_testdata_file("CT_small.dcm")
    with Client(twin_server.grpc_url) as client:
        result = client.query(ct)
    assert result.triton_model == "cxr_resnet_realtime"
    assert result.model_name == "cxr_resnet"


def test_batch_priority_uses_batch_model(twin_server: EmbeddedTritonServer) -> None:
    ct = get_testdata_file("CT_small.dcm")
    with Client(twin_server.grpc_url, priority=BATCH_PRIORITY) as client:
        result = client.query(ct)
    assert result.triton_model == "cxr_resnet"


def test_twin_scores_equal_batch(twin_server: EmbeddedTritonServer) -> None:
    ct = get_testdata_file("CT_small.dcm")
    with Client(twin_server.grpc_url) as realtime:
        fast = realtime.query(ct)
    with Client(twin_server.grpc_url, priority=BATCH_PRIORITY) as batch:
        slow = batch.query(ct)
    assert fast.score == pytest.approx(slow.score, abs=1e-6)
