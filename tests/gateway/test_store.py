"""Gateway results in SQLite: kept across a restart, bounded in number."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file

from clinfer.errors import ConfigurationError
from clinfer.gateway.app import GatewaySettings, create_app
from clinfer.gateway.store import RESULTS_FILE, ResultStore, StoredResult

AUTH = {"Authorization": "Bearer query-token-alice"}


def _upload(client: TestClient) -> dict:
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    response = client.post(
        "/v1/studies/query",
        files=[("files", ("CT_small.dcm", data, "application/dicom"))],
        headers=AUTH,
    )
    assert response.status_code == 200
    return response.json()


def test_result_survives_restart(settings: GatewaySettings, tmp_path: Path) -> None:
    persistent = dataclasses.replace(settings, state_dir=tmp_path / "state")
    with TestClient(create_app(persistent)) as first:
        body = _upload(first)
        image = first.get(body["image_url"], headers=AUTH).content
    assert (tmp_path / "state" / RESULTS_FILE).is_file()
    with TestClient(create_app(persistent)) as second:
        again = second.get(f"/v1/results/{body['result_id']}", headers=AUTH)
        restored_image = second.get(body["image_url"], headers=AUTH)
    assert again.status_code == 200
    assert again.json() == body
    assert restored_image.status_code == 200
    assert restored_image.content == image


def test_result_needs_token(client: TestClient) -> None:
    body = _upload(client)
    assert client.get(f"/v1/results/{body['result_id']}").status_code == 401


def test_unknown_result_404(client: TestClient) -> None:
    response = client.get("/v1/results/0123456789abcdef01234567", headers=AUTH)
    assert response.status_code == 404
    assert "newest" in response.json()["detail"]


def test_store_deletes_oldest(tmp_path: Path) -> None:
    path = tmp_path / RESULTS_FILE
    store = ResultStore(path, max_results=3)
    for index in range(5):
        store.add(f"r{index}", StoredResult({"n": index}, b"png", None))
    store.close()
    reopened = ResultStore(path, max_results=3)
    assert len(reopened) == 3
    assert reopened.get("r0") is None
    assert reopened.get("r1") is None
    newest = reopened.get("r4")
    assert newest is not None
    assert newest.body == {"n": 4}
    assert newest.frame_png == b"png"
    assert newest.heatmap_png is None


def test_store_rejects_zero_limit(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="max_results"):
        ResultStore(tmp_path / RESULTS_FILE, max_results=0)
