"""HTTP-level checks of the gateway against a real embedded Triton server."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file

from clinfer.gateway.app import GatewaySettings, create_app
from clinfer.privacy import short_hash

# The same tokens as the tokens file written by conftest.gateway_dir.
QUERY_TOKEN = "query-token-alice"
READ_TOKEN = "read-only-token-bob"
AUTH = {"Authorization": f"Bearer {QUERY_TOKEN}"}
QUERY = "/v1/studies/query"


def _ct() -> Path:
    return Path(get_testdata_file("CT_small.dcm"))


def _upload(
    client: TestClient,
    name: str = "CT_small.dcm",
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    **form: str,
):
    payload = _ct().read_bytes() if data is None else data
    return client.post(
        QUERY,
        files=[("files", (name, payload, "application/dicom"))],
        data=form,
        headers=AUTH if headers is None else headers,
    )


def _audit(settings: GatewaySettings) -> list[dict]:
    lines = settings.audit_log.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_missing_token_401(client: TestClient) -> None:
    assert _upload(client, headers={}).status_code == 401


def test_invalid_token_401(client: TestClient) -> None:
    response = _upload(client, headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401


def test_token_without_scope_403(client: TestClient) -> None:
    response = _upload(client, headers={"Authorization": f"Bearer {READ_TOKEN}"})
    assert response.status_code == 403


def test_query_scores_ct(client: TestClient) -> None:
    response = _upload(client)
    assert response.status_code == 200
    body = response.json()
    assert body["model_name"] == "cxr_resnet"
    assert 0.0 <= body["score"] <= 1.0
    assert f"{body['threshold']:.3f}" in body["label_text"]
    assert body["label"] in body["label_text"]
    assert len(body["model_sha256"]) == 64
    assert body["validation_note"] == "no validation report for this model"
    assert body["instances"][0]["path"] == "CT_small.dcm"
    assert body["has_heatmap"] is False


def test_result_image_png(client: TestClient) -> None:
    result_id = _upload(client).json()["result_id"]
    response = client.get(f"/v1/results/{result_id}/image.png", headers=AUTH)
    assert response.status_code == 200
    assert response.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_heatmap_404_without_saliency(client: TestClient) -> None:
    result_id = _upload(client).json()["result_id"]
    response = client.get(f"/v1/results/{result_id}/heatmap.png", headers=AUTH)
    assert response.status_code == 404


def test_request_too_large_413(client: TestClient) -> None:
    response = _upload(client, data=b"\0" * (3 * 1024 * 1024))
    assert response.status_code == 413


def test_too_many_files_413(client: TestClient) -> None:
    payload = _ct().read_bytes()
    files = [("files", (f"f{i}.dcm", payload, "application/dicom")) for i in range(5)]
    response = client.post(QUERY, files=files, headers=AUTH)
    assert response.status_code == 413


def test_bad_dicom_422_names_file(client: TestClient) -> None:
    response = _upload(client, name="broken.dcm", data=b"not a dicom file" * 20)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail["file"] == "broken.dcm"
    assert detail["reason"]


def test_bad_emr_json_422(client: TestClient) -> None:
    response = _upload(client, emr="{not json")
    assert response.status_code == 422
    assert response.json()["detail"]["field"] == "emr"


def test_emr_not_object_422(client: TestClient) -> None:
    response = _upload(client, emr="[1, 2]")
    assert response.status_code == 422


def test_reference_query_scores(client: TestClient) -> None:
    response = client.post(
        "/v1/studies/query-by-reference", json={"path": "study1"}, headers=AUTH
    )
    assert response.status_code == 200
    assert response.json()["instances"][0]["path"] == "ct.dcm"


@pytest.mark.parametrize("path", ["../tokens.json", "/etc/passwd", "study1/../../"])
def test_reference_traversal_rejected(client: TestClient, path: str) -> None:
    response = client.post(
        "/v1/studies/query-by-reference", json={"path": path}, headers=AUTH
    )
    assert response.status_code == 400


def test_audit_one_entry_per_request(
    client: TestClient, settings: GatewaySettings
) -> None:
    _upload(client)
    _upload(client, headers={})
    _upload(client, name="broken.dcm", data=b"garbage" * 50)
    entries = _audit(settings)
    assert [e["status_code"] for e in entries] == [200, 401, 422]
    uid = str(pydicom.dcmread(_ct(), stop_before_pixels=True).StudyInstanceUID)
    assert entries[0]["study"] == short_hash(uid)
    assert entries[0]["user"] == "alice"
    assert entries[0]["model_version"] == "1"
    text = settings.audit_log.read_text(encoding="utf-8")
    assert uid not in text


def test_no_phi_in_logs_or_audit(
    client: TestClient, settings: GatewaySettings, caplog: pytest.LogCaptureFixture
) -> None:
    ds = pydicom.dcmread(_ct(), stop_before_pixels=True)
    phi = [str(ds.PatientName), str(ds.PatientID), str(ds.StudyInstanceUID)]
    caplog.set_level(logging.DEBUG)
    response = _upload(client)
    body = response.text
    logged = caplog.text + settings.audit_log.read_text(encoding="utf-8")
    for value in phi:
        assert value not in logged, value
    for value in phi:
        assert value not in body, value


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200


def test_readyz_with_server(client: TestClient) -> None:
    assert client.get("/readyz").status_code == 200


def test_readyz_dead_url_503(settings: GatewaySettings) -> None:
    from clinfer.server import free_port

    settings.triton_urls = [f"127.0.0.1:{free_port()}"]
    with TestClient(create_app(settings)) as dead:
        assert dead.get("/readyz").status_code == 503


def test_page_has_banner(client: TestClient) -> None:
    response = client.get("/")
    assert "Not for diagnostic use without review" in response.text


def test_openapi_lists_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert QUERY in paths
    assert "/v1/studies/query-by-reference" in paths
