"""The gateway's /metrics: route templates, priority classes and status codes."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydicom.data import get_testdata_file

QUERY_TOKEN = "query-token-alice"
AUTH = {"Authorization": f"Bearer {QUERY_TOKEN}"}
QUERY = "/v1/studies/query"
IMAGE_ROUTE = "/v1/results/{result_id}/image.png"


def _samples(client: TestClient) -> dict[tuple[str, frozenset], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _upload(client: TestClient, headers: dict[str, str]) -> dict:
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    response = client.post(
        QUERY,
        files=[("files", ("CT_small.dcm", data, "application/dicom"))],
        headers=headers,
    )
    return {"status": response.status_code, "body": response.json()}


def test_metrics_count_query(client: TestClient) -> None:
    scored = _upload(client, AUTH)
    assert scored["status"] == 200
    samples = _samples(client)
    latency = "clinfer_gateway_request_seconds_count"
    responses = "clinfer_gateway_responses_total"
    assert _value(samples, latency, route=QUERY, priority="realtime", outcome="ok") == 1
    assert _value(samples, responses, route=QUERY, code="200") == 1


def test_metrics_include_client(client: TestClient) -> None:
    assert _upload(client, AUTH)["status"] == 200
    samples = _samples(client)
    name = "clinfer_client_query_seconds_count"
    assert _value(samples, name, priority="realtime", outcome="ok") == 1


def test_metrics_count_rejections(client: TestClient) -> None:
    assert _upload(client, {})["status"] == 401
    samples = _samples(client)
    name = "clinfer_gateway_responses_total"
    assert _value(samples, name, route=QUERY, code="401") == 1
    assert _value(samples, name, route=QUERY, code="200") == 0


def test_metrics_use_route_template(client: TestClient) -> None:
    result_id = _upload(client, AUTH)["body"]["result_id"]
    assert client.get(f"/v1/results/{result_id}/image.png", headers=AUTH).is_success
    response = client.get("/metrics")
    assert result_id not in response.text
    assert QUERY_TOKEN not in response.text
    samples = _samples(client)
    name = "clinfer_gateway_responses_total"
    assert _value(samples, name, route=IMAGE_ROUTE, code="200") == 1


def test_metrics_unknown_path_other(client: TestClient) -> None:
    path = "/v1/studies/1.2.840.113619.2.1"
    assert client.get(path).status_code == 404
    response = client.get("/metrics")
    assert "1.2.840.113619" not in response.text
    samples = _samples(client)
    name = "clinfer_gateway_responses_total"
    assert _value(samples, name, route="other", code="404") == 1
