"""Real-time queries of the multimodal composition: client, gateway and priority."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from clinfer.client import Client
from clinfer.export.composition import priority_counts
from clinfer.export.repository import REALTIME_PRIORITY
from clinfer.workers.preprocess import PreprocessConfig, load_and_preprocess
from fastapi.testclient import TestClient

from clinfer.gateway.app import GatewaySettings, create_app
from clinfer.gateway.auth import hash_token
from clinfer.server import EmbeddedTritonServer
from clinfer.train.cohort import EMR_CSV_NAME, CohortManifest
from clinfer.train.emr import EMR_FEATURES, emr_features, read_emr_csv

TOKEN = "query-token-carol"


@pytest.fixture(scope="module")
def study(mm_cohort: CohortManifest) -> tuple[Path, dict[str, float]]:
    """A positive test-split study and its EMR record keyed by feature name."""
    records = read_emr_csv(mm_cohort.root / EMR_CSV_NAME)
    patient = next(p for p in mm_cohort.split("test") if p.finding_present)
    record = records[(patient.patient_id, patient.accession_number)]
    return mm_cohort.path_of(patient.dicom_path), dict(
        zip(EMR_FEATURES, emr_features(record))
    )


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


def test_client_priority_reaches_composing_models(
    study: tuple[Path, dict[str, float]], mm_server: EmbeddedTritonServer
) -> None:
    import urllib.request

    def counts() -> dict[tuple[str, str], float]:
        with urllib.request.urlopen(mm_server.metrics_url, timeout=10) as response:
            return priority_counts(response.read().decode())

    path, emr = study
    before = counts()
    with Client([mm_server.grpc_url], model="multimodal") as client:
        client.query(path, emr=emr)
    after = counts()
    priority = str(REALTIME_PRIORITY)
    for model in ("cxr_cnn", "emr_mlp", "fusion"):
        gained = after.get((model, priority), 0) - before.get((model, priority), 0)
        assert gained == 1, model


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
