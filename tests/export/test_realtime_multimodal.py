"""Real-time queries of the multimodal composition: routing, copies and priority."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from clinfer.client import Client
from clinfer.client.triton import TritonModelClient
from clinfer.export.composition import (
    COMPOSING_MODELS,
    COMPOSITION_NAME,
    PRIORITY_PARAMETER,
    priority_counts,
)
from clinfer.export.multimodal import ExportReport
from clinfer.export.repository import BATCH_PRIORITY, REALTIME_PRIORITY
from clinfer.workers.pipeline import RESULTS_FILE, JobOptions, run_job
from clinfer.workers.preprocess import PreprocessConfig, load_and_preprocess
from fastapi.testclient import TestClient

from clinfer.gateway.app import GatewaySettings, create_app
from clinfer.gateway.auth import hash_token
from clinfer.server import EmbeddedTritonServer
from clinfer.train.cohort import EMR_CSV_NAME, CohortManifest
from clinfer.train.emr import EMR_FEATURES, emr_features, read_emr_csv, write_emr_csv

TOKEN = "query-token-carol"
REALTIME = str(REALTIME_PRIORITY)
BATCH = str(BATCH_PRIORITY)
COPIES = tuple(f"{name}_realtime" for name in COMPOSING_MODELS)
JOB_PATIENTS = 2


@pytest.fixture(scope="module")
def study(mm_cohort: CohortManifest) -> tuple[Path, dict[str, float]]:
    """A positive test-split study and its EMR record keyed by feature name."""
    records = read_emr_csv(mm_cohort.root / EMR_CSV_NAME)
    patient = next(p for p in mm_cohort.split("test") if p.finding_present)
    record = records[(patient.patient_id, patient.accession_number)]
    return mm_cohort.path_of(patient.dicom_path), dict(
        zip(EMR_FEATURES, emr_features(record))
    )


def _counts(server: EmbeddedTritonServer) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        return priority_counts(response.read().decode())


def _gained(
    before: dict[tuple[str, str], float],
    after: dict[tuple[str, str], float],
    model: str,
    priority: str,
) -> float:
    return after.get((model, priority), 0.0) - before.get((model, priority), 0.0)


def test_client_returns_fusion_score(
    study: tuple[Path, dict[str, float]], mm_server: EmbeddedTritonServer
) -> None:
    path, emr = study
    with Client([mm_server.grpc_url], model="multimodal") as client:
        result = client.query(path, emr=emr)
    frame = load_and_preprocess(path, PreprocessConfig()).frames
    grpc = triton_grpc.InferenceServerClient(mm_server.grpc_url)
    inputs = []
    for name, array in (
        ("image", frame),
        ("emr", np.asarray([list(emr.values())], np.float32)),
    ):
        tensor = triton_grpc.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    expected = grpc.infer("multimodal", inputs).as_numpy("fusion_probabilities")[0, 1]
    grpc.close()
    assert result.emr_used
    assert result.score == pytest.approx(float(expected), abs=1e-6)


def test_client_returns_saliency(
    study: tuple[Path, dict[str, float]], mm_server: EmbeddedTritonServer
) -> None:
    path, emr = study
    with Client([mm_server.grpc_url], model="multimodal") as client:
        result = client.query(path, emr=emr)
    assert result.saliency is not None
    assert result.saliency.shape[-2:] == (224, 224)


@pytest.mark.parametrize("name", [*COMPOSING_MODELS, COMPOSITION_NAME])
def test_copy_has_batch_versions(mm_export: ExportReport, name: str) -> None:
    batch = json.loads((mm_export.repository / name / "clinfer.json").read_text())
    copy = json.loads(
        (mm_export.repository / f"{name}_realtime" / "clinfer.json").read_text()
    )
    folders = sorted(
        p.name for p in (mm_export.repository / f"{name}_realtime").iterdir()
    )
    assert copy["versions"] == batch["versions"]
    assert copy["name"] == f"{name}_realtime"
    assert [v for v in folders if v.isdigit()] == sorted(batch["versions"])


def test_copy_serves_same_bytes(mm_export: ExportReport) -> None:
    version = str(mm_export.models["cxr_cnn"].version)
    batch = mm_export.repository / "cxr_cnn" / version / "model.onnx"
    copy = mm_export.repository / "cxr_cnn_realtime" / version / "model.onnx"
    assert copy.read_bytes() == batch.read_bytes()


def test_report_lists_copies(mm_export: ExportReport) -> None:
    assert mm_export.realtime_copies == [*COPIES, "multimodal_realtime"]


def test_client_routes_to_realtime_copy(
    study: tuple[Path, dict[str, float]],
    mm_server: EmbeddedTritonServer,
    mm_export: ExportReport,
) -> None:
    path, emr = study
    with Client([mm_server.grpc_url], model="multimodal") as client:
        result = client.query(path, emr=emr)
    assert result.model_name == "multimodal"
    assert result.triton_model == "multimodal_realtime"
    assert result.model_version == str(mm_export.composition_version)


def test_realtime_query_reaches_copies(
    study: tuple[Path, dict[str, float]], mm_server: EmbeddedTritonServer
) -> None:
    path, emr = study
    before = _counts(mm_server)
    with Client([mm_server.grpc_url], model="multimodal") as client:
        client.query(path, emr=emr)
    after = _counts(mm_server)
    for model in ("multimodal_realtime", *COPIES):
        assert _gained(before, after, model, REALTIME) == 1, model
    for model in (COMPOSITION_NAME, *COMPOSING_MODELS):
        assert _gained(before, after, model, REALTIME) == 0, model


def test_batch_client_stays_on_batch(
    study: tuple[Path, dict[str, float]], mm_server: EmbeddedTritonServer
) -> None:
    path, emr = study
    before = _counts(mm_server)
    with Client(
        [mm_server.grpc_url], model="multimodal", priority=BATCH_PRIORITY
    ) as client:
        result = client.query(path, emr=emr)
    after = _counts(mm_server)
    assert result.triton_model == "multimodal"
    for model in (COMPOSITION_NAME, *COMPOSING_MODELS):
        assert _gained(before, after, model, BATCH) == 1, model
    for model in ("multimodal_realtime", *COPIES):
        assert _gained(before, after, model, BATCH) == 0, model


def test_both_paths_equal(
    study: tuple[Path, dict[str, float]], mm_server: EmbeddedTritonServer
) -> None:
    path, emr = study
    results = {}
    for priority in (REALTIME_PRIORITY, BATCH_PRIORITY):
        with Client(
            [mm_server.grpc_url], model="multimodal", priority=priority
        ) as client:
            results[priority] = client.query(path, emr=emr)
    realtime, batch = results[REALTIME_PRIORITY], results[BATCH_PRIORITY]
    assert realtime.triton_model != batch.triton_model
    assert realtime.score == batch.score
    assert realtime.instances[0].scores == batch.instances[0].scores
    assert np.array_equal(realtime.saliency, batch.saliency)


def test_job_stays_on_batch_models(
    mm_cohort: CohortManifest,
    mm_server: EmbeddedTritonServer,
    local_ray: None,
    tmp_path: Path,
) -> None:
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    records = read_emr_csv(mm_cohort.root / EMR_CSV_NAME)
    rows = []
    for patient in mm_cohort.split("test")[:JOB_PATIENTS]:
        source = mm_cohort.path_of(patient.dicom_path)
        shutil.copy(source, dicom / source.name)
        rows.append(records[(patient.patient_id, patient.accession_number)])
    write_emr_csv(rows, tmp_path / "emr.csv")
    options = JobOptions(
        paths=[str(dicom)],
        out_dir=tmp_path / "out",
        triton_urls=[mm_server.grpc_url],
        model="multimodal",
        emr_csv=tmp_path / "emr.csv",
    )
    before = _counts(mm_server)
    summary = run_job(options)
    after = _counts(mm_server)
    assert summary.instances_scored == JOB_PATIENTS
    assert (tmp_path / "out" / RESULTS_FILE).is_file()
    assert _gained(before, after, "fusion", BATCH) >= 1
    for model in ("multimodal_realtime", *COPIES):
        for priority in (REALTIME, BATCH):
            assert _gained(before, after, model, priority) == 0, (model, priority)


def test_workers_client_stays_on_batch(
    mm_server: EmbeddedTritonServer, mm_test_inputs: dict[str, np.ndarray]
) -> None:
    client = TritonModelClient(mm_server.grpc_url, COMPOSITION_NAME)
    spec = client.fetch_spec()
    before = _counts(mm_server)
    client.infer_multimodal(
        mm_test_inputs["image"][:2],
        mm_test_inputs["emr"][:2],
        spec,
        priority=BATCH_PRIORITY,
    )
    after = _counts(mm_server)
    assert spec.name == COMPOSITION_NAME
    assert _gained(before, after, "cxr_cnn", BATCH) == 1
    assert _gained(before, after, "cxr_cnn_realtime", BATCH) == 0


def test_realtime_overtakes_composition_queue(
    study: tuple[Path, dict[str, float]],
    mm_server: EmbeddedTritonServer,
    mm_test_inputs: dict[str, np.ndarray],
) -> None:
    # Twenty-four 16-frame batch requests fill about twelve executions of the
    # composition's single instance, each calling the three batch models. The
    # real-time query is sent once the first one has completed, so the rest are
    # queued. It runs on the real-time copies, so it does not wait for them.
    total = 24
    order: list[str] = []
    lock = threading.Lock()
    first_done = threading.Event()
    all_done = threading.Event()
    path, emr = study
    indices = np.arange(16) % len(mm_test_inputs["image"])
    tensors = []
    for name in ("image", "emr"):
        array = np.ascontiguousarray(mm_test_inputs[name][indices], np.float32)
        tensor = triton_grpc.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    batch = triton_grpc.InferenceServerClient(mm_server.grpc_url)

    def done(result: object, error: object) -> None:
        with lock:
            order.append("batch" if error is None else "batch_error")
            count = len([item for item in order if item.startswith("batch")])
        first_done.set()
        if count == total:
            all_done.set()

    try:
        with Client([mm_server.grpc_url], model="multimodal") as client:
            client.served_model(mm_server.grpc_url)
            for _ in range(total):
                batch.async_infer(
                    COMPOSITION_NAME,
                    tensors,
                    done,
                    priority=BATCH_PRIORITY,
                    parameters={PRIORITY_PARAMETER: BATCH_PRIORITY},
                )
            assert first_done.wait(timeout=300)
            result = client.query(path, emr=emr)
        with lock:
            order.append("realtime")
        assert all_done.wait(timeout=300)
    finally:
        batch.close()

    assert result.triton_model == "multimodal_realtime"
    assert "batch_error" not in order
    assert order.index("realtime") < total // 2


def test_gateway_serves_heatmap(
    study: tuple[Path, dict[str, float]],
    mm_server: EmbeddedTritonServer,
    tmp_path: Path,
) -> None:
    path, emr = study
    tokens = {hash_token(TOKEN): {"user": "carol", "scopes": ["query"]}}
    (tmp_path / "tokens.json").write_text(json.dumps(tokens), encoding="utf-8")
    settings = GatewaySettings(
        triton_urls=[mm_server.grpc_url],
        tokens_file=tmp_path / "tokens.json",
        audit_log=tmp_path / "audit.jsonl",
        storage_root=tmp_path,
        model="multimodal",
    )
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/v1/studies/query",
            headers=headers,
            files=[("files", (path.name, path.read_bytes(), "application/dicom"))],
            data={"emr": json.dumps(emr)},
        )
        assert response.status_code == 200, response.text
        result_id = response.json()["result_id"]
        heatmap = client.get(f"/v1/results/{result_id}/heatmap.png", headers=headers)
    assert heatmap.status_code == 200
    assert heatmap.content.startswith(b"\x89PNG")
