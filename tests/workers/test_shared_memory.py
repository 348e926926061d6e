"""Input tensors in POSIX shared memory, and the fused decode-and-score stage."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from clinfer.client.triton import ModelSpec, TritonModelClient
from clinfer.workers.stages import ScoreStage

from clinfer.corpus import find_test_file
from clinfer.errors import InferenceError
from clinfer.server import EmbeddedTritonServer


@pytest.fixture(scope="module")
def spec(triton_server: EmbeddedTritonServer) -> ModelSpec:
    client = TritonModelClient(triton_server.grpc_url, "cxr_resnet")
    try:
        return client.fetch_spec()
    finally:
        client.close()


def _images(count: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.random((count, 1, 224, 224), dtype=np.float32)


def _region_names(client: TritonModelClient) -> set[str]:
    status = client._client.get_system_shared_memory_status(as_json=True)
    return {region["name"] for region in status.get("regions", {}).values()}


def test_shared_memory_matches_grpc(
    triton_server: EmbeddedTritonServer, spec: ModelSpec
) -> None:
    images = _images(3)
    plain = TritonModelClient(triton_server.grpc_url, "cxr_resnet")
    shared = TritonModelClient(triton_server.grpc_url, "cxr_resnet", shared_memory=True)
    try:
        expected = plain.infer(images, spec, priority=2)
        got = shared.infer(images, spec, priority=2)
        assert shared.uses_shared_memory
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    finally:
        plain.close()
        shared.close()


def test_region_released_on_close(
    triton_server: EmbeddedTritonServer, spec: ModelSpec
) -> None:
    client = TritonModelClient(triton_server.grpc_url, "cxr_resnet", shared_memory=True)
    observer = TritonModelClient(triton_server.grpc_url, "cxr_resnet")
    try:
        client.infer(_images(1), spec, priority=2)
        region = client._input_region
        assert region is not None
        assert region.name in _region_names(observer)
        client.close()
        assert region.name not in _region_names(observer)
        assert not Path("/dev/shm", region.name).exists()
    finally:
        observer.close()


def test_region_grows_with_batch(
    triton_server: EmbeddedTritonServer, spec: ModelSpec
) -> None:
    client = TritonModelClient(triton_server.grpc_url, "cxr_resnet", shared_memory=True)
    try:
        client.infer(_images(1), spec, priority=2)
        got = client.infer(_images(4), spec, priority=2)
        assert got.shape == (4, len(spec.labels))
        assert client._input_region is not None
        assert client._input_region.byte_size >= _images(4).nbytes
    finally:
        client.close()


def test_remote_server_uses_grpc() -> None:
    # The channel connects lazily, so no request leaves this machine.
    client = TritonModelClient(
        "triton.example.invalid:8001", "cxr_resnet", shared_memory=True
    )
    try:
        assert not client.uses_shared_memory
    finally:
        client.close()


def test_forgotten_region_reregistered(
    triton_server: EmbeddedTritonServer, spec: ModelSpec
) -> None:
    client = TritonModelClient(triton_server.grpc_url, "cxr_resnet", shared_memory=True)
    try:
        client.infer(_images(2), spec, priority=2)
        old = client._input_region
        assert old is not None
        # As after a server restart: the server has no record of the region.
        client._client.unregister_system_shared_memory(old.name)
        with pytest.raises(InferenceError):
            client.infer(_images(2), spec, priority=2)
        got = client.infer(_images(2), spec, priority=2)
        assert got.shape == (2, len(spec.labels))
        assert client._input_region is not None
        assert client._input_region.name != old.name
    finally:
        client.close()


def test_score_stage_splits_requests(
    triton_server: EmbeddedTritonServer, spec: ModelSpec
) -> None:
    # emri_small.dcm has 10 frames: with MR_small.dcm and a missing file, 11 frame
    # rows and one failure row, sent as requests of at most 4 frames.
    paths = [
        find_test_file("emri_small.dcm"),
        "/nonexistent/missing.dcm",
        find_test_file("MR_small.dcm"),
    ]
    stage = ScoreStage(
        height=spec.height,
        width=spec.width,
        strict=False,
        urls=[triton_server.grpc_url],
        spec=asdict(spec),
        priority=2,
        request_size=4,
    )
    batch = {
        "path": np.array([str(p) for p in paths]),
        "sop_instance_uid": np.array(["1.2.3.1", "1.2.3.2", "1.2.3.3"]),
    }
    out = stage(batch)
    ok = out["ok"].astype(bool)
    assert len(ok) == 12
    assert int(ok.sum()) == 11
    assert "tensor" not in out
    assert not np.isnan(out["scores"][ok]).any()
    assert np.isnan(out["scores"][~ok]).all()
    # One request_ms value per request: ceil(11 / 4) requests.
    assert int((~np.isnan(out["request_ms"])).sum()) == 3


def test_score_stage_rejects_zero_request() -> None:
    with pytest.raises(ValueError):
        ScoreStage(
            height=224,
            width=224,
            strict=False,
            urls=["127.0.0.1:1"],
            spec={},
            priority=2,
            request_size=0,
        )
