"""Tests of the synthetic cohort: determinism, DICOM files, EMR links and labels."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from clinfer.workers.preprocess import PreprocessConfig, load_and_preprocess
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.uid import UID

from clinfer.errors import ConfigurationError
from clinfer.train.cohort import (
    MANIFEST_NAME,
    VENDORS,
    CohortManifest,
    generate_cohort,
    split_of,
)
from clinfer.train.emr import LOINC, QUANTITIES, EmrRecord, emr_risk_score
from clinfer.train.synthetic_dicom import TRANSFER_SYNTAXES

from .conftest import COHORT_SIZE, SMALL_SIZE

HEADER_KEYWORDS = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "Manufacturer",
    "PatientName",
    "PatientID",
    "PatientSex",
    "PatientAge",
    "AccessionNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "PhotometricInterpretation",
    "BitsStored",
    "RescaleSlope",
    "RescaleIntercept",
)


def _files(manifest: CohortManifest) -> list[str]:
    return sorted(
        str(path.relative_to(manifest.root))
        for path in manifest.root.rglob("*")
        if path.is_file()
    )


def _resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [
        entry["resource"]
        for entry in bundle["entry"]
        if entry["resource"]["resourceType"] == kind
    ]


def _full_url(bundle: dict[str, Any], kind: str) -> str:
    (url,) = [
        entry["fullUrl"]
        for entry in bundle["entry"]
        if entry["resource"]["resourceType"] == kind
    ]
    return url


# Determinism


def test_same_seed_same_manifest(
    small_cohorts: tuple[CohortManifest, CohortManifest],
) -> None:
    first, second = small_cohorts
    assert first.to_json_dict() == second.to_json_dict()


def test_same_seed_same_file_list(
    small_cohorts: tuple[CohortManifest, CohortManifest],
) -> None:
    first, second = small_cohorts
    assert _files(first) == _files(second)


def test_same_seed_same_bytes(
    small_cohorts: tuple[CohortManifest, CohortManifest],
) -> None:
    first, second = small_cohorts
    for name in _files(first):
        first_bytes = (first.root / name).read_bytes()
        assert first_bytes == (second.root / name).read_bytes(), name


def test_same_seed_same_pixels(
    small_cohorts: tuple[CohortManifest, CohortManifest],
) -> None:
    first, second = small_cohorts
    for patient in first.patients:
        a = dcmread(first.path_of(patient.dicom_path)).pixel_array
        b = dcmread(second.path_of(patient.dicom_path)).pixel_array
        assert np.array_equal(a, b), patient.dicom_path


def test_other_seed_other_pixels(
    small_cohorts: tuple[CohortManifest, CohortManifest],
    other_seed_cohort: CohortManifest,
) -> None:
    hashes = {patient.pixel_sha256 for patient in small_cohorts[0].patients}
    other = {patient.pixel_sha256 for patient in other_seed_cohort.patients}
    assert hashes.isdisjoint(other)


def test_other_seed_other_ids(
    small_cohorts: tuple[CohortManifest, CohortManifest],
    other_seed_cohort: CohortManifest,
) -> None:
    ids = {patient.patient_id for patient in small_cohorts[0].patients}
    other = {patient.patient_id for patient in other_seed_cohort.patients}
    assert ids.isdisjoint(other)


def test_larger_cohort_extends_smaller(
    cohort: CohortManifest, small_cohorts: tuple[CohortManifest, CohortManifest]
) -> None:
    assert cohort.patients[:SMALL_SIZE] == small_cohorts[0].patients


def test_manifest_load_roundtrip(cohort: CohortManifest) -> None:
    assert CohortManifest.load(cohort.root) == cohort


# DICOM files


def test_all_transfer_syntaxes_used(cohort: CohortManifest) -> None:
    used = {patient.transfer_syntax_uid for patient in cohort.patients}
    assert used == {str(uid) for uid in TRANSFER_SYNTAXES}


@pytest.mark.parametrize("syntax", TRANSFER_SYNTAXES, ids=lambda uid: uid.name)
def test_files_decode(cohort: CohortManifest, syntax: UID) -> None:
    patients = [p for p in cohort.patients if p.transfer_syntax_uid == syntax]
    assert patients
    for patient in patients:
        ds = dcmread(cohort.path_of(patient.dicom_path))
        assert ds.file_meta.TransferSyntaxUID == syntax, patient.dicom_path
        pixels = ds.pixel_array.astype(np.uint16)
        digest = hashlib.sha256(pixels.tobytes()).hexdigest()
        assert digest == patient.pixel_sha256, patient.dicom_path


@pytest.mark.parametrize("syntax", TRANSFER_SYNTAXES, ids=lambda uid: uid.name)
def test_files_preprocess(cohort: CohortManifest, syntax: UID) -> None:
    patient = next(p for p in cohort.patients if p.transfer_syntax_uid == syntax)
    result = load_and_preprocess(
        cohort.path_of(patient.dicom_path), PreprocessConfig(height=224, width=224)
    )
    assert result.frames.shape == (1, 1, 224, 224)
    assert result.frames.min() >= 0.0
    assert result.frames.max() <= 1.0


@pytest.mark.parametrize("keyword", HEADER_KEYWORDS)
def test_tag_present(headers: list[Dataset], keyword: str) -> None:
    missing = [ds.InstanceNumber for ds in headers if keyword not in ds]
    assert missing == []


def test_modalities_cr_and_dx(headers: list[Dataset]) -> None:
    assert {ds.Modality for ds in headers} == {"CR", "DX"}


def test_body_part_chest(headers: list[Dataset]) -> None:
    assert {ds.BodyPartExamined for ds in headers} == {"CHEST"}


def test_views_pa_and_ap(headers: list[Dataset]) -> None:
    assert {ds.ViewPosition for ds in headers} == {"PA", "AP"}


def test_manufacturers_fake(headers: list[Dataset]) -> None:
    assert {ds.Manufacturer for ds in headers} == {vendor for vendor, _ in VENDORS}


def test_patient_names_synthetic(headers: list[Dataset]) -> None:
    names = [str(ds.PatientName) for ds in headers]
    assert all(re.fullmatch(r"SYNTHETIC\^PATIENT\d{4}", name) for name in names)


def test_patient_ids_synthetic(headers: list[Dataset]) -> None:
    assert all(re.fullmatch(r"SYNP\d{12}", ds.PatientID) for ds in headers)


def test_accession_numbers_synthetic(headers: list[Dataset]) -> None:
    assert all(re.fullmatch(r"SYNA\d{12}", ds.AccessionNumber) for ds in headers)


def test_patient_ids_unique(headers: list[Dataset]) -> None:
    assert len({ds.PatientID for ds in headers}) == COHORT_SIZE


def test_accession_numbers_unique(headers: list[Dataset]) -> None:
    assert len({ds.AccessionNumber for ds in headers}) == COHORT_SIZE


@pytest.mark.parametrize(
    "keyword", ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
)
def test_uids_valid(headers: list[Dataset], keyword: str) -> None:
    assert all(UID(ds[keyword].value).is_valid for ds in headers)


@pytest.mark.parametrize(
    "keyword", ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
)
def test_uids_unique(headers: list[Dataset], keyword: str) -> None:
    assert len({ds[keyword].value for ds in headers}) == COHORT_SIZE


def test_patient_sex_values(headers: list[Dataset]) -> None:
    assert {ds.PatientSex for ds in headers} == {"M", "F"}


def test_patient_age_format(headers: list[Dataset]) -> None:
    assert all(re.fullmatch(r"\d{3}Y", ds.PatientAge) for ds in headers)


def test_monochrome1_present(headers: list[Dataset]) -> None:
    assert any(ds.PhotometricInterpretation == "MONOCHROME1" for ds in headers)


def test_monochrome2_present(headers: list[Dataset]) -> None:
    assert any(ds.PhotometricInterpretation == "MONOCHROME2" for ds in headers)


def test_bits_stored_12_to_16(headers: list[Dataset]) -> None:
    assert {ds.BitsStored for ds in headers} == {12, 13, 14, 15, 16}


def test_rescale_varies(headers: list[Dataset]) -> None:
    pairs = {(float(ds.RescaleSlope), float(ds.RescaleIntercept)) for ds in headers}
    assert len(pairs) > 1


def test_voi_lut_present(headers: list[Dataset]) -> None:
    assert any("VOILUTSequence" in ds for ds in headers)


def test_window_present(headers: list[Dataset]) -> None:
    assert any("WindowCenter" in ds for ds in headers)


def test_every_file_has_voi(headers: list[Dataset]) -> None:
    without = [
        ds.PatientName
        for ds in headers
        if "WindowCenter" not in ds and "VOILUTSequence" not in ds
    ]
    assert without == []


def test_headers_match_manifest(cohort: CohortManifest, headers: list[Dataset]) -> None:
    for patient, ds in zip(cohort.patients, headers):
        assert ds.PatientID == patient.patient_id, patient.dicom_path
        assert ds.AccessionNumber == patient.accession_number, patient.dicom_path
        assert ds.StudyInstanceUID == patient.study_instance_uid, patient.dicom_path


# EMR and FHIR


def test_emr_one_row_per_patient(
    emr_rows: dict[tuple[str, str], EmrRecord],
) -> None:
    assert len(emr_rows) == COHORT_SIZE


def test_emr_rows_link_to_dicom(
    headers: list[Dataset], emr_rows: dict[tuple[str, str], EmrRecord]
) -> None:
    unlinked = [
        ds.InstanceNumber
        for ds in headers
        if (ds.PatientID, ds.AccessionNumber) not in emr_rows
    ]
    assert unlinked == []


def test_emr_sex_matches_dicom(
    headers: list[Dataset], emr_rows: dict[tuple[str, str], EmrRecord]
) -> None:
    for ds in headers:
        assert emr_rows[(ds.PatientID, ds.AccessionNumber)].sex == ds.PatientSex


def test_emr_age_matches_dicom(
    headers: list[Dataset], emr_rows: dict[tuple[str, str], EmrRecord]
) -> None:
    for ds in headers:
        record = emr_rows[(ds.PatientID, ds.AccessionNumber)]
        assert f"{record.age_years:03d}Y" == ds.PatientAge


def test_fhir_bundle_per_patient(bundles: list[dict[str, Any]]) -> None:
    assert [bundle["type"] for bundle in bundles] == ["collection"] * COHORT_SIZE


def test_fhir_patient_id_matches_dicom(
    headers: list[Dataset], bundles: list[dict[str, Any]]
) -> None:
    for ds, bundle in zip(headers, bundles):
        (patient,) = _resources(bundle, "Patient")
        assert patient["identifier"][0]["value"] == ds.PatientID


def test_fhir_accession_matches_dicom(
    headers: list[Dataset], bundles: list[dict[str, Any]]
) -> None:
    for ds, bundle in zip(headers, bundles):
        (order,) = _resources(bundle, "ServiceRequest")
        (identifier,) = order["identifier"]
        assert identifier["type"]["coding"][0]["code"] == "ACSN"
        assert identifier["value"] == ds.AccessionNumber


def test_fhir_study_uid_matches_dicom(
    headers: list[Dataset], bundles: list[dict[str, Any]]
) -> None:
    for ds, bundle in zip(headers, bundles):
        (study,) = _resources(bundle, "ImagingStudy")
        assert study["identifier"][0]["value"] == f"urn:oid:{ds.StudyInstanceUID}"


def test_fhir_observations_reference_patient(bundles: list[dict[str, Any]]) -> None:
    for bundle in bundles:
        patient = _full_url(bundle, "Patient")
        for observation in _resources(bundle, "Observation"):
            assert observation["subject"]["reference"] == patient


def test_fhir_observations_reference_order(bundles: list[dict[str, Any]]) -> None:
    for bundle in bundles:
        order = _full_url(bundle, "ServiceRequest")
        for observation in _resources(bundle, "Observation"):
            assert observation["basedOn"] == [{"reference": order}]


def test_fhir_observations_loinc(bundles: list[dict[str, Any]]) -> None:
    for bundle in bundles:
        for observation in _resources(bundle, "Observation"):
            assert observation["code"]["coding"][0]["system"] == LOINC


def test_fhir_observation_count(bundles: list[dict[str, Any]]) -> None:
    counts = {len(_resources(bundle, "Observation")) for bundle in bundles}
    assert counts == {len(QUANTITIES) + 1}


def test_fhir_values_match_csv(
    bundles: list[dict[str, Any]], emr_rows: dict[tuple[str, str], EmrRecord]
) -> None:
    loinc_to_column = {spec.loinc: spec.column for spec in QUANTITIES}
    for bundle in bundles:
        (patient,) = _resources(bundle, "Patient")
        (order,) = _resources(bundle, "ServiceRequest")
        record = emr_rows[
            (patient["identifier"][0]["value"], order["identifier"][0]["value"])
        ]
        for observation in _resources(bundle, "Observation"):
            code = observation["code"]["coding"][0]["code"]
            if code in loinc_to_column:
                expected = getattr(record, loinc_to_column[code])
                assert observation["valueQuantity"]["value"] == expected, code


# Labels, splits and findings


def test_label_rule_holds(cohort: CohortManifest) -> None:
    for patient in cohort.patients:
        expected = int(patient.finding_present and patient.emr_risk_score > 0)
        assert patient.label == expected, patient.index


def test_risk_score_from_emr_csv(
    cohort: CohortManifest, emr_rows: dict[tuple[str, str], EmrRecord]
) -> None:
    for patient in cohort.patients:
        record = emr_rows[(patient.patient_id, patient.accession_number)]
        assert emr_risk_score(record) == patient.emr_risk_score, patient.index


def test_finding_alone_not_positive(cohort: CohortManifest) -> None:
    assert any(p.finding_present and p.label == 0 for p in cohort.patients)


def test_high_risk_alone_not_positive(cohort: CohortManifest) -> None:
    assert any(p.emr_risk_high and p.label == 0 for p in cohort.patients)


def test_label_prevalence(cohort: CohortManifest) -> None:
    prevalence = np.mean([patient.label for patient in cohort.patients])
    assert 0.15 < prevalence < 0.35


def test_splits_follow_rule(cohort: CohortManifest) -> None:
    for patient in cohort.patients:
        assert patient.split == split_of(patient.patient_id), patient.index


def test_split_sizes(cohort: CohortManifest) -> None:
    sizes = {name: len(cohort.split(name)) for name in ("train", "validation", "test")}
    assert min(sizes.values()) >= 0.15 * COHORT_SIZE, sizes


def test_masks_only_with_findings(cohort: CohortManifest) -> None:
    for patient in cohort.patients:
        assert (patient.mask_path is not None) == patient.finding_present


def test_mask_matches_boxes(cohort: CohortManifest) -> None:
    for patient in cohort.patients:
        if patient.mask_path is None:
            continue
        mask = np.asarray(Image.open(cohort.path_of(patient.mask_path))) > 0
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        boxes = np.array([finding.box for finding in patient.findings])
        union = (
            int(boxes[:, 0].min()),
            int(boxes[:, 1].min()),
            int(boxes[:, 2].max()),
            int(boxes[:, 3].max()),
        )
        assert (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1) == union, patient.index


def test_boxes_inside_image(cohort: CohortManifest) -> None:
    for patient in cohort.patients:
        for finding in patient.findings:
            row_min, col_min, row_max, col_max = finding.box
            assert 0 <= row_min < row_max <= patient.rows, patient.index
            assert 0 <= col_min < col_max <= patient.columns, patient.index


# Invalid input


def test_nonempty_out_rejected(tmp_path: Path) -> None:
    (tmp_path / "other.txt").write_text("not a cohort", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="not an empty folder"):
        generate_cohort(1, tmp_path, seed=0)


def test_zero_patients_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        generate_cohort(0, tmp_path / "cohort", seed=0)


def test_negative_seed_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-negative"):
        generate_cohort(1, tmp_path / "cohort", seed=-1)


def test_missing_manifest_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=MANIFEST_NAME):
        CohortManifest.load(tmp_path)
