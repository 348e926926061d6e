"""Tests of the Structured Report and heatmap Secondary Capture writers."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from clinfer.workers.preprocess import (
    PreprocessConfig,
    _pad_and_resize,
    load_and_preprocess,
)
from pydicom.sr.codedict import codes

from clinfer.dicom_out import (
    ModelResult,
    heatmap_to_source,
    write_heatmap_capture,
    write_structured_report,
)
from clinfer.dicom_out.capture import pad_geometry
from clinfer.dicom_out.heatmap import class_activation_map
from clinfer.dicom_out.verify import dciodvfy_errors
from clinfer.errors import DicomOutputError
from clinfer.train.cohort import CohortManifest, PatientRecord, generate_cohort
from clinfer.train.models import CxrCnn

RESULT = ModelResult.from_score(
    model_name="fusion",
    model_version="c0e631a4d1fa",
    weights_sha256="c0e631a4d1fa" + "0" * 52,
    score=0.83,
    threshold=0.41,
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> CohortManifest:
    return generate_cohort(8, tmp_path_factory.mktemp("dicom_out_cohort"), seed=0)


@pytest.fixture(scope="module")
def patient(cohort: CohortManifest) -> PatientRecord:
    """A patient with a finding and a non-square image, so padding matters."""
    return next(p for p in cohort.patients if p.findings and p.rows != p.columns)


def _box_heatmap(patient: PatientRecord) -> np.ndarray:
    """Forward-map a mask of the finding box into the 224 x 224 model input."""
    mask = np.zeros((patient.rows, patient.columns), dtype=np.float32)
    top, left, bottom, right = patient.findings[0].box
    mask[top:bottom, left:right] = 1.0
    return _pad_and_resize(mask, PreprocessConfig())[0]


@pytest.fixture(scope="module")
def capture_path(
    cohort: CohortManifest,
    patient: PatientRecord,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    path = cohort.path_of(patient.dicom_path)
    frame = load_and_preprocess(path, PreprocessConfig()).frames[0]
    out = tmp_path_factory.mktemp("sc") / "sc.dcm"
    return write_heatmap_capture(
        pydicom.dcmread(path), frame, _box_heatmap(patient), RESULT, out
    )


@pytest.fixture(scope="module")
def report_path(
    cohort: CohortManifest,
    patient: PatientRecord,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    source = pydicom.dcmread(
        cohort.path_of(patient.dicom_path), stop_before_pixels=True
    )
    out = tmp_path_factory.mktemp("sr") / "sr.dcm"
    return write_structured_report([source], RESULT, out)


def test_result_label_checked() -> None:
    with pytest.raises(ValueError, match="label"):
        ModelResult("m", "1", "0" * 64, score=0.9, threshold=0.5, label="negative")


def test_heatmap_inverse_recovers_box(patient: PatientRecord) -> None:
    mapped = heatmap_to_source(_box_heatmap(patient), patient.rows, patient.columns)
    top, left, bottom, right = patient.findings[0].box
    inside = np.zeros(mapped.shape, dtype=bool)
    inside[top:bottom, left:right] = True
    high = mapped > 0.5
    iou = (high & inside).sum() / (high | inside).sum()
    assert mapped.shape == (patient.rows, patient.columns)
    assert iou > 0.9


def test_pad_geometry_centres() -> None:
    assert pad_geometry(352, 288) == (352, 0, 32)


def test_sr_reads_back(report_path: Path) -> None:
    sr = hd.sr.srread(report_path)
    assert isinstance(sr, hd.sr.EnhancedSR)


def test_sr_references_source(report_path: Path, patient: PatientRecord) -> None:
    sr = pydicom.dcmread(report_path)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    series = evidence.ReferencedSeriesSequence[0]
    assert sr.StudyInstanceUID == patient.study_instance_uid
    assert evidence.StudyInstanceUID == patient.study_instance_uid
    assert series.SeriesInstanceUID == patient.series_instance_uid
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        patient.sop_instance_uid
    )


def test_sr_records_scores(report_path: Path, patient: PatientRecord) -> None:
    sr = hd.sr.srread(report_path)
    group = sr.content.get_image_measurement_groups()[0]
    values = {m.name.meaning: m.value for m in group.get_measurements()}
    evaluation = group.get_qualitative_evaluations()[0]
    source = group.source_images[0]
    assert values["Probability"] == pytest.approx(RESULT.score)
    assert values["Threshold Value"] == pytest.approx(RESULT.threshold)
    assert evaluation.value == codes.SCT.Positive
    assert source.referenced_sop_instance_uid == patient.sop_instance_uid


def test_sr_names_model(report_path: Path) -> None:
    sr = pydicom.dcmread(report_path)
    texts = {str(e.value) for e in sr.iterall() if e.keyword == "TextValue"}
    assert RESULT.model_name in sr.SeriesDescription
    assert f"weights_sha256={RESULT.weights_sha256}" in texts
    assert RESULT.model_version in texts


def test_sr_passes_dciodvfy(report_path: Path) -> None:
    assert dciodvfy_errors(report_path) == []


def test_sr_rejects_two_studies(cohort: CohortManifest, tmp_path: Path) -> None:
    sources = [
        pydicom.dcmread(cohort.path_of(p.dicom_path), stop_before_pixels=True)
        for p in cohort.patients[:2]
    ]
    with pytest.raises(DicomOutputError, match="studies"):
        write_structured_report(sources, RESULT, tmp_path / "sr.dcm")


def test_sc_reads_back(capture_path: Path) -> None:
    image = hd.imread(capture_path)
    assert image.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage


def test_sc_references_source(capture_path: Path, patient: PatientRecord) -> None:
    sc = pydicom.dcmread(capture_path)
    assert sc.StudyInstanceUID == patient.study_instance_uid
    assert (
        sc.SourceImageSequence[0].ReferencedSOPInstanceUID == patient.sop_instance_uid
    )
    assert (
        sc.ReferencedSeriesSequence[0].SeriesInstanceUID == patient.series_instance_uid
    )


def test_sc_names_model(capture_path: Path) -> None:
    sc = pydicom.dcmread(capture_path)
    assert RESULT.model_name in sc.SeriesDescription
    assert RESULT.weights_sha256 in sc.DerivationDescription


def test_sc_has_source_geometry(capture_path: Path, patient: PatientRecord) -> None:
    pixels = pydicom.dcmread(capture_path).pixel_array
    assert pixels.shape == (patient.rows, patient.columns, 3)


def test_sc_overlay_is_red_on_finding(
    capture_path: Path, patient: PatientRecord
) -> None:
    pixels = pydicom.dcmread(capture_path).pixel_array.astype(int)
    top, left, bottom, right = patient.findings[0].box
    centre = pixels[(top + bottom) // 2, (left + right) // 2]
    corner = pixels[2, 2]
    assert centre[0] > centre[1]
    assert corner[0] == corner[1] == corner[2]


def test_sc_passes_dciodvfy(capture_path: Path) -> None:
    assert dciodvfy_errors(capture_path) == []


def test_sc_rejects_other_frame(
    cohort: CohortManifest, patient: PatientRecord, tmp_path: Path
) -> None:
    path = cohort.path_of(patient.dicom_path)
    other = next(p for p in cohort.patients if p is not patient)
    frame = load_and_preprocess(cohort.path_of(other.dicom_path), PreprocessConfig())
    with pytest.raises(DicomOutputError, match="differs"):
        write_heatmap_capture(
            pydicom.dcmread(path),
            frame.frames[0],
            np.zeros((224, 224), dtype=np.float32),
            RESULT,
            tmp_path / "sc.dcm",
        )


def test_cam_matches_input_size() -> None:
    frame = np.random.default_rng(0).uniform(size=(1, 224, 224)).astype(np.float32)
    assert class_activation_map(CxrCnn(), frame).shape == (224, 224)
