"""Invalid EMR values: named in the error, and no other study is lost."""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from clinfer.client.query import Client
from clinfer.workers.pipeline import RESULTS_FILE, JobOptions, run_job
from fastapi.testclient import TestClient

from clinfer.errors import EmrInputError
from clinfer.gateway.app import GatewaySettings, create_app
from clinfer.gateway.auth import hash_token
from clinfer.server import EmbeddedTritonServer
from clinfer.train.cohort import EMR_CSV_NAME, CohortManifest
from clinfer.train.emr import EMR_COLUMNS, read_emr_csv

PATIENTS = 4
TOKEN = "query-token-fay"


def _rows(mm_cohort: CohortManifest) -> list[dict[str, str]]:
    with (mm_cohort.root / EMR_CSV_NAME).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _write(rows: list[dict[str, str]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=EMR_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _row_of(rows: list[dict[str, str]], patient) -> dict[str, str]:
    return next(
        row
        for row in rows
        if (row["patient_id"], row["accession_number"])
        == (patient.patient_id, patient.accession_number)
    )


def test_reader_names_line_column_value(
    mm_cohort: CohortManifest, tmp_path: Path
) -> None:
    rows = _rows(mm_cohort)[:3]
    rows[1] = {**rows[1], "age_years": "seventy"}
    _write(rows, tmp_path / "emr.csv")
    invalid: dict = {}
    records = read_emr_csv(tmp_path / "emr.csv", invalid=invalid)
    assert len(records) == 2
    assert "line 3: column age_years has 'seventy'" in next(iter(invalid.values()))


def test_reader_without_invalid_raises(
    mm_cohort: CohortManifest, tmp_path: Path
) -> None:
    rows = _rows(mm_cohort)[:2]
    rows[0] = {**rows[0], "sex": "unknown"}
    _write(rows, tmp_path / "emr.csv")
    with pytest.raises(ValueError, match="column sex has 'unknown'"):
        read_emr_csv(tmp_path / "emr.csv")


def test_job_fails_only_bad_row_study(
    mm_cohort: CohortManifest,
    mm_server: EmbeddedTritonServer,
    local_ray: None,
    tmp_path: Path,
) -> None:
    patients = mm_cohort.split("test")[:PATIENTS]
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    all_rows = _rows(mm_cohort)
    rows = []
    for patient in patients:
        source = mm_cohort.path_of(patient.dicom_path)
        shutil.copy(source, dicom / source.name)
        rows.append(_row_of(all_rows, patient))
    rows[0] = {**rows[0], "crp_mg_per_l": "n/a"}
    _write(rows, tmp_path / "emr.csv")
    options = JobOptions(
        paths=[str(dicom)],
        out_dir=tmp_path / "out",
        triton_urls=[mm_server.grpc_url],
        model="multimodal",
        emr_csv=tmp_path / "emr.csv",
    )
    summary = run_job(options)
    with sqlite3.connect(tmp_path / "out" / RESULTS_FILE) as db:
        failures = db.execute("SELECT reason, message FROM failures").fetchall()
    assert summary.instances_scored == PATIENTS - 1
    assert [reason for reason, _ in failures] == ["invalid_emr"]
    assert "column crp_mg_per_l has 'n/a'" in failures[0][1]


def test_client_accepts_cohort_csv_row(
    mm_cohort: CohortManifest, mm_server: EmbeddedTritonServer, tmp_path: Path
) -> None:
    patient = mm_cohort.split("test")[0]
    _write([_row_of(_rows(mm_cohort), patient)], tmp_path / "emr.csv")
    with Client(mm_server.grpc_url, model="multimodal") as client:
        result = client.query(
            [mm_cohort.path_of(patient.dicom_path)], emr=tmp_path / "emr.csv"
        )
    assert 0.0 <= result.score <= 1.0


def test_client_bad_value_not_failed_over(
    mm_cohort: CohortManifest, mm_server: EmbeddedTritonServer
) -> None:
    patient = mm_cohort.split("test")[0]
    record = {**_row_of(_rows(mm_cohort), patient), "spo2_percent": "low"}
    urls = [mm_server.grpc_url, mm_server.grpc_url]
    with Client(urls, model="multimodal") as client:
        with pytest.raises(EmrInputError, match="spo2_percent has 'low'"):
            client.query([mm_cohort.path_of(patient.dicom_path)], emr=record)


@pytest.fixture
def gateway(mm_server: EmbeddedTritonServer, tmp_path: Path) -> TestClient:
    tokens = {hash_token(TOKEN): {"user": "fay", "scopes": ["query"]}}
    (tmp_path / "tokens.json").write_text(json.dumps(tokens), encoding="utf-8")
    settings = GatewaySettings(
        triton_urls=[mm_server.grpc_url],
        tokens_file=tmp_path / "tokens.json",
        audit_log=tmp_path / "audit.jsonl",
        storage_root=tmp_path,
        model="multimodal",
    )
    return TestClient(create_app(settings))


def _upload(gateway: TestClient, path: Path, emr: dict) -> object:
    return gateway.post(
        "/v1/studies/query",
        files=[("files", (path.name, path.read_bytes(), "application/dicom"))],
        data={"emr": json.dumps(emr)},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )


def test_gateway_accepts_raw_columns(
    gateway: TestClient, mm_cohort: CohortManifest
) -> None:
    patient = mm_cohort.split("test")[0]
    row = _row_of(_rows(mm_cohort), patient)
    raw = {key: row[key] for key in EMR_COLUMNS[3:]}
    response = _upload(gateway, mm_cohort.path_of(patient.dicom_path), raw)
    assert response.status_code == 200, response.text


def test_gateway_names_bad_raw_column(
    gateway: TestClient, mm_cohort: CohortManifest
) -> None:
    patient = mm_cohort.split("test")[0]
    row = _row_of(_rows(mm_cohort), patient)
    raw = {**{key: row[key] for key in EMR_COLUMNS[3:]}, "smoking_status": "often"}
    response = _upload(gateway, mm_cohort.path_of(patient.dicom_path), raw)
    assert response.status_code == 422
    assert response.json()["detail"]["field"] == "smoking_status"
