"""A gateway query of the multimodal composition carries the fusion model's report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from clinfer.gateway.app import GatewaySettings, create_app
from clinfer.gateway.auth import hash_token
from clinfer.server import EmbeddedTritonServer
from clinfer.train.cohort import EMR_CSV_NAME, CohortManifest
from clinfer.train.emr import EMR_FEATURES, emr_features, read_emr_csv

TOKEN = "query-token-erin"
REPORT = {
    "decision": {"overall": "GO"},
    "threshold": {"value": 0.255},
    "test": {
        "n": 142,
        "auroc": {"auroc": 0.963, "ci_lower": 0.917, "ci_upper": 0.995},
        "operating_point": {"sensitivity": 0.939, "specificity": 0.853},
    },
    "data": {"synthetic": True},
}


@pytest.fixture
def client(mm_server: EmbeddedTritonServer, tmp_path: Path) -> TestClient:
    tokens = {hash_token(TOKEN): {"user": "erin", "scopes": ["query"]}}
    (tmp_path / "tokens.json").write_text(json.dumps(tokens), encoding="utf-8")
    report_dir = tmp_path / "validation" / "fusion"
    report_dir.mkdir(parents=True)
    (report_dir / "report.json").write_text(json.dumps(REPORT), encoding="utf-8")
    settings = GatewaySettings(
        triton_urls=[mm_server.grpc_url],
        tokens_file=tmp_path / "tokens.json",
        audit_log=tmp_path / "audit.jsonl",
        storage_root=tmp_path,
        model="multimodal",
        validation_dir=tmp_path / "validation",
    )
    return TestClient(create_app(settings))


def test_multimodal_query_shows_fusion_report(
    client: TestClient, mm_cohort: CohortManifest
) -> None:
    records = read_emr_csv(mm_cohort.root / EMR_CSV_NAME)
    patient = next(iter(mm_cohort.split("test")))
    record = records[(patient.patient_id, patient.accession_number)]
    emr = dict(zip(EMR_FEATURES, emr_features(record), strict=True))
    path = mm_cohort.path_of(patient.dicom_path)
    response = client.post(
        "/v1/studies/query",
        files=[("files", (path.name, path.read_bytes(), "application/dicom"))],
        data={"emr": json.dumps(emr)},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["validation"]["test_auroc"] == pytest.approx(0.963)
