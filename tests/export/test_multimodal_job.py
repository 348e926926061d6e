"""The scoring job with the served multimodal composition: EMR join and DICOM outputs."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pydicom
import pytest
from clinfer.client.triton import TritonModelClient
from clinfer.export.repository import BATCH_PRIORITY
from clinfer.workers.pipeline import RESULTS_FILE, JobOptions, JobSummary, run_job
from clinfer.workers.preprocess import PreprocessConfig, load_and_preprocess

from clinfer.errors import ConfigurationError
from clinfer.server import EmbeddedTritonServer
from clinfer.train.cohort import EMR_CSV_NAME, CohortManifest
from clinfer.train.emr import emr_features, read_emr_csv, write_emr_csv

PATIENTS = 12
WITHOUT_EMR = 3


@pytest.fixture(scope="module")
def study_folder(
    mm_cohort: CohortManifest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, set[str]]:
    """Copy a few test-split studies and an EMR file lacking some of their rows."""
    root = tmp_path_factory.mktemp("mm_job")
    dicom = root / "dicom"
    dicom.mkdir()
    patients = mm_cohort.split("test")[:PATIENTS]
    records = read_emr_csv(mm_cohort.root / EMR_CSV_NAME)
    kept = []
    missing = set()
    for index, patient in enumerate(patients):
        source = mm_cohort.path_of(patient.dicom_path)
        shutil.copy(source, dicom / source.name)
        key = (patient.patient_id, patient.accession_number)
        if index < WITHOUT_EMR:
            missing.add(patient.sop_instance_uid)
        else:
            kept.append(records[key])
    emr = root / "emr.csv"
    write_emr_csv(kept, emr)
    return dicom, emr, missing


@pytest.fixture(scope="module")
def multimodal_job(
    study_folder: tuple[Path, Path, set[str]],
    mm_server: EmbeddedTritonServer,
    local_ray: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, JobSummary]:
    dicom, emr, _ = study_folder
    out = tmp_path_factory.mktemp("mm_job_out")
    options = JobOptions(
        paths=[str(dicom)],
        out_dir=out,
        triton_urls=[mm_server.grpc_url],
        model="multimodal",
        emr_csv=emr,
        dicom_out=out / "dicom",
    )
    return out, run_job(options)


def _rows(out: Path, query: str) -> list[tuple]:
    with sqlite3.connect(out / RESULTS_FILE) as db:
        return db.execute(query).fetchall()


def test_job_scores_every_study(multimodal_job: tuple[Path, JobSummary]) -> None:
    _, summary = multimodal_job
    assert summary.instances_scored == PATIENTS


def test_job_emr_status_per_instance(
    multimodal_job: tuple[Path, JobSummary], study_folder: tuple[Path, Path, set[str]]
) -> None:
    out, _ = multimodal_job
    status = dict(_rows(out, "SELECT sop_instance_uid, emr_status FROM instances"))
    missing = {uid for uid, value in status.items() if value == "missing"}
    joined = {uid for uid, value in status.items() if value == "joined"}
    assert missing == study_folder[2]
    assert len(joined) == PATIENTS - WITHOUT_EMR


def test_job_missing_emr_scored_image_only(
    multimodal_job: tuple[Path, JobSummary],
) -> None:
    out, _ = multimodal_job
    rows = _rows(
        out, "SELECT score, outputs_json FROM instances WHERE emr_status = 'missing'"
    )
    assert rows
    for score, outputs in rows:
        assert score == pytest.approx(json.loads(outputs)["image_score"], abs=1e-6)
        assert "emr_score" not in json.loads(outputs)


def test_job_scores_match_served_model(
    multimodal_job: tuple[Path, JobSummary],
    study_folder: tuple[Path, Path, set[str]],
    mm_server: EmbeddedTritonServer,
) -> None:
    out, _ = multimodal_job
    records = read_emr_csv(study_folder[1])
    client = TritonModelClient(mm_server.grpc_url, "multimodal")
    spec = client.fetch_spec()
    rows = _rows(out, "SELECT path, score FROM instances WHERE emr_status = 'joined'")
    for path, score in rows:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        emr = np.asarray([emr_features(records[(ds.PatientID, ds.AccessionNumber)])])
        frame = load_and_preprocess(path, PreprocessConfig()).frames
        outputs = client.infer_multimodal(frame, emr, spec, priority=BATCH_PRIORITY)
        expected = float(outputs[spec.output_name][0, spec.positive_index])
        assert score == pytest.approx(expected, abs=1e-6), path
    client.close()


def test_job_rows_carry_version_hash(multimodal_job: tuple[Path, JobSummary]) -> None:
    out, summary = multimodal_job
    hashes = {h for (h,) in _rows(out, "SELECT model_sha256 FROM instances")}
    assert hashes == {summary.model_sha256}
    assert len(summary.model_sha256) == 64


def test_job_writes_sr_per_study(multimodal_job: tuple[Path, JobSummary]) -> None:
    out, _ = multimodal_job
    rows = _rows(
        out,
        "SELECT o.sr_path, s.study_instance_uid FROM dicom_outputs o JOIN "
        "studies s USING (study_instance_uid)",
    )
    assert len(rows) == PATIENTS
    for sr_path, study_uid in rows:
        sr = pydicom.dcmread(sr_path)
        assert sr.StudyInstanceUID == study_uid
        assert sr.Modality == "SR"


def test_job_writes_capture_per_study(multimodal_job: tuple[Path, JobSummary]) -> None:
    out, _ = multimodal_job
    rows = _rows(
        out,
        "SELECT o.sc_path, i.sop_instance_uid, i.study_instance_uid FROM "
        "dicom_outputs o JOIN instances i USING (study_instance_uid)",
    )
    assert len(rows) == PATIENTS
    for sc_path, sop_uid, study_uid in rows:
        sc = pydicom.dcmread(sc_path)
        assert sc.StudyInstanceUID == study_uid
        assert sc.SamplesPerPixel == 3
        referenced = {
            item.ReferencedSOPInstanceUID
            for series in sc.get("ReferencedSeriesSequence", [])
            for item in series.ReferencedInstanceSequence
        } | {
            item.ReferencedSOPInstanceUID for item in sc.get("SourceImageSequence", [])
        }
        assert sop_uid in referenced


def test_job_rerun_writes_nothing_new(
    multimodal_job: tuple[Path, JobSummary],
    study_folder: tuple[Path, Path, set[str]],
    mm_server: EmbeddedTritonServer,
) -> None:
    out, _ = multimodal_job
    dicom, emr, _ = study_folder
    options = JobOptions(
        paths=[str(dicom)],
        out_dir=out,
        triton_urls=[mm_server.grpc_url],
        model="multimodal",
        emr_csv=emr,
        dicom_out=out / "dicom",
    )
    summary = run_job(options)
    assert summary.instances_scored == 0
    assert summary.dicom_outputs == 0


def test_job_requires_emr_for_multimodal(
    study_folder: tuple[Path, Path, set[str]],
    mm_server: EmbeddedTritonServer,
    local_ray: None,
    tmp_path: Path,
) -> None:
    options = JobOptions(
        paths=[str(study_folder[0])],
        out_dir=tmp_path,
        triton_urls=[mm_server.grpc_url],
        model="multimodal",
    )
    with pytest.raises(ConfigurationError, match="--emr"):
        run_job(options)


def test_summary_names_training(multimodal_job: tuple[Path, JobSummary]) -> None:
    _, summary = multimodal_job
    assert "synthetic" in summary.model_training
