"""Synthetic EMR records: sampling, risk score, CSV and FHIR R4 Bundles, features."""

from __future__ import annotations

import csv
import logging
import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SMOKING_STATUSES = ("never", "former", "current")

# SNOMED CT concepts coding the smoking-status Observation value.
SMOKING_SNOMED = {
    "never": ("266919005", "Never smoked tobacco"),
    "former": ("8517006", "Ex-smoker"),
    "current": ("77176002", "Smoker"),
}

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
PATIENT_ID_SYSTEM = "urn:clinfer:synthetic:patient-id"
ACCESSION_SYSTEM = "urn:clinfer:synthetic:accession-number"

# Namespace of the deterministic FHIR resource ids (uuid5 of seed, patient and role).
FHIR_NAMESPACE = uuid.UUID("6f1c9a52-3d0e-4b8e-9a57-0c1e2f3a4b5c")


@dataclass(frozen=True)
class QuantitySpec:
    """FHIR Observation coding of one numeric EMR column."""

    column: str
    loinc: str
    display: str
    category: str
    unit: str
    ucum: str


QUANTITIES = (
    QuantitySpec("age_years", "30525-0", "Age", "survey", "years", "a"),
    QuantitySpec(
        "heart_rate_bpm", "8867-4", "Heart rate", "vital-signs", "/min", "/min"
    ),
    QuantitySpec(
        "spo2_percent",
        "59408-5",
        "Oxygen saturation in Arterial blood by Pulse oximetry",
        "vital-signs",
        "%",
        "%",
    ),
    QuantitySpec(
        "temperature_c", "8310-5", "Body temperature", "vital-signs", "C", "Cel"
    ),
    QuantitySpec(
        "respiratory_rate_per_min",
        "9279-1",
        "Respiratory rate",
        "vital-signs",
        "/min",
        "/min",
    ),
    QuantitySpec(
        "crp_mg_per_l",
        "1988-5",
        "C reactive protein [Mass/volume] in Serum or Plasma",
        "laboratory",
        "mg/L",
        "mg/L",
    ),
    QuantitySpec(
        "wbc_10e9_per_l",
        "6690-2",
        "Leukocytes [#/volume] in Blood by Automated count",
        "laboratory",
        "10^3/uL",
        "10*3/uL",
    ),
)
SMOKING_LOINC = ("72166-2", "Tobacco smoking status")

# Model inputs derived from an EmrRecord, in this order. CRP and WBC are right-skewed,
# so the models see their natural logarithms.
EMR_FEATURES = (
    "age_years",
    "sex_male",
    "heart_rate_bpm",
    "spo2_percent",
    "temperature_c",
    "respiratory_rate_per_min",
    "log_crp_mg_per_l",
    "log_wbc_10e9_per_l",
    "smoking_former",
    "smoking_current",
)


@dataclass(frozen=True)
class EmrRecord:
    """One patient's EMR row, linked to the study by PatientID and AccessionNumber."""

    patient_id: str
    accession_number: str
    study_date: str
    age_years: int
    sex: str
    heart_rate_bpm: int
    spo2_percent: int
    temperature_c: float
    respiratory_rate_per_min: int
    crp_mg_per_l: float
    wbc_10e9_per_l: float
    smoking_status: str


EMR_COLUMNS = tuple(field.name for field in fields(EmrRecord))


def sample_emr(
    rng: np.random.Generator,
    *,
    patient_id: str,
    accession_number: str,
    study_date: str,
    age_years: int,
    sex: str,
) -> EmrRecord:
    """Draw vitals, labs and smoking status from adult-inpatient-like distributions.

    The columns are drawn independently of each other and of the image, rounded as an
    EMR records them and clipped to plausible ranges.
    """
    smoking = SMOKING_STATUSES[int(rng.choice(3, p=[0.5, 0.3, 0.2]))]
    return EmrRecord(
        patient_id=patient_id,
        accession_number=accession_number,
        study_date=study_date,
        age_years=age_years,
        sex=sex,
        heart_rate_bpm=int(np.clip(round(rng.normal(82.0, 13.0)), 45, 150)),
        spo2_percent=int(np.clip(round(rng.normal(96.0, 2.5)), 82, 100)),
        temperature_c=round(float(np.clip(rng.normal(37.1, 0.6), 35.5, 40.5)), 1),
        respiratory_rate_per_min=int(np.clip(round(rng.normal(17.0, 4.0)), 10, 40)),
        crp_mg_per_l=round(
            float(np.clip(rng.lognormal(math.log(8.0), 1.0), 0.3, 300)), 1
        ),
        wbc_10e9_per_l=round(
            float(np.clip(rng.lognormal(math.log(8.0), 0.35), 1.0, 40.0)), 1
        ),
        smoking_status=smoking,
    )


def emr_risk_score(record: EmrRecord) -> float:
    """Return the synthetic EMR risk score of a record (0 is the high-risk threshold).

    A weighted sum of standardised age, log CRP, log WBC, temperature, SpO2 deficit,
    respiratory rate, heart rate and smoking, centred so that about half of the cohort
    scores above 0. It uses only the recorded (rounded) values, so a model given the
    EMR row can recover it exactly.
    """
    smoking = {"never": 0.0, "former": 0.4, "current": 0.8}[record.smoking_status]
    score = (
        0.9 * (record.age_years - 62.0) / 14.0
        + 1.0 * (math.log(record.crp_mg_per_l) - math.log(8.0))
        + 0.7 * (math.log(record.wbc_10e9_per_l) - math.log(8.0)) / 0.35
        + 0.6 * (record.temperature_c - 37.1) / 0.6
        + 0.6 * (96.0 - record.spo2_percent) / 2.5
        + 0.4 * (record.respiratory_rate_per_min - 17.0) / 4.0
        + 0.3 * (record.heart_rate_bpm - 82.0) / 13.0
        + smoking
        - 0.28
    )
    return round(score, 6)


def emr_features(record: EmrRecord) -> list[float]:
    """Return the model inputs of a record, in ``EMR_FEATURES`` order."""
    return [
        float(record.age_years),
        1.0 if record.sex == "M" else 0.0,
        float(record.heart_rate_bpm),
        float(record.spo2_percent),
        record.temperature_c,
        float(record.respiratory_rate_per_min),
        math.log(record.crp_mg_per_l),
        math.log(record.wbc_10e9_per_l),
        1.0 if record.smoking_status == "former" else 0.0,
        1.0 if record.smoking_status == "current" else 0.0,
    ]


def model_inputs(record: Mapping[str, Any]) -> dict[str, float]:
    """Return the model inputs of one EMR record given as a mapping.

    ``record`` has either the derived inputs (every name of ``EMR_FEATURES``) or
    the raw columns of the EMR CSV (``age_years``, ``sex``, ``crp_mg_per_l``,
    ``smoking_status``, ...), as a row of the CSV or a JSON object with those keys.
    Raw columns are converted with :func:`emr_features`, the same code the scoring
    job uses. ``patient_id``, ``accession_number`` and ``study_date`` are optional.

    Raises
    ------
    ValueError
        If a value is missing, does not parse or is out of range; the message names
        the column and the value.
    """
    if all(name in record for name in EMR_FEATURES):
        values = {}
        for name in EMR_FEATURES:
            try:
                values[name] = float(record[name])
            except (TypeError, ValueError):
                raise EmrValueError(
                    name, f"{name} has {record[name]!r}, which is not a number"
                ) from None
        return values
    optional = {"patient_id": "", "accession_number": "", "study_date": ""}
    row = {**optional, **{key: record[key] for key in record}}
    absent = [name for name in EMR_COLUMNS if name not in row]
    if absent:
        raise EmrValueError(
            absent[0],
            f"the EMR record lacks {absent}; give the EMR CSV columns "
            f"{list(EMR_COLUMNS[3:])} or the model inputs {list(EMR_FEATURES)}",
        )
    parsed = _parse_row({key: str(value) for key, value in row.items()})
    return dict(zip(EMR_FEATURES, emr_features(parsed), strict=True))


def write_emr_csv(records: Iterable[EmrRecord], path: Path) -> None:
    """Write EMR records as CSV with a header row of ``EMR_COLUMNS``."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=EMR_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for record in records:
            writer.writerow(asdict(record))


def read_emr_csv(
    path: Path, *, invalid: dict[tuple[str, str], str] | None = None
) -> dict[tuple[str, str], EmrRecord]:
    """Read an EMR CSV written by ``write_emr_csv``, keyed by (PatientID, Accession).

    Parameters
    ----------
    path
        The CSV file.
    invalid
        When given, a row whose values do not parse (or whose CRP or WBC is not
        positive, or whose sex or smoking status is not a known code) is left out
        and its message, naming the line, column and value, is stored here under
        the row's key; the other rows are still read. Without it such a row
        raises.

    Raises
    ------
    ValueError
        If a column is missing, a key repeats, or (without ``invalid``) a value does
        not parse.
    """
    records: dict[tuple[str, str], EmrRecord] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = set(EMR_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"EMR CSV {path} is missing columns {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            key = (row["patient_id"], row["accession_number"])
            if key in records:
                raise ValueError(
                    f"EMR CSV {path} line {line} repeats a PatientID and "
                    "AccessionNumber pair of an earlier line"
                )
            try:
                records[key] = _parse_row(row)
            except ValueError as exc:
                message = f"EMR CSV {path} line {line}: {exc}"
                if invalid is None:
                    raise ValueError(message) from exc
                invalid[key] = message
    return records


class EmrValueError(ValueError):
    """An EMR value that is missing, does not parse or is out of range."""

    def __init__(self, column: str | None, message: str) -> None:
        super().__init__(message)
        self.column = column


_CASTS: dict[str, Any] = {"int": int, "float": float, "str": str}
_CODES = {"sex": ("F", "M"), "smoking_status": ("never", "former", "current")}
_POSITIVE = ("crp_mg_per_l", "wbc_10e9_per_l")


def _parse_row(row: dict[str, str]) -> EmrRecord:
    """Build a record from one CSV row; the error names the column and value."""
    values: dict[str, Any] = {}
    for field in fields(EmrRecord):
        text = row[field.name]
        kind = str(field.type)
        try:
            values[field.name] = _CASTS[kind](text)
        except ValueError:
            raise EmrValueError(
                field.name,
                f"column {field.name} has {text!r}, which is not a {kind} value",
            ) from None
    for name, codes in _CODES.items():
        if values[name] not in codes:
            raise EmrValueError(
                name, f"column {name} has {values[name]!r}, expected one of {codes}"
            )
    for name in _POSITIVE:
        if not values[name] > 0:
            raise EmrValueError(
                name, f"column {name} has {values[name]!r}, expected a value > 0"
            )
    return EmrRecord(**values)


def _resource_id(seed: int, index: int, role: str) -> str:
    return str(uuid.uuid5(FHIR_NAMESPACE, f"{seed}/{index}/{role}"))


def _category(code: str) -> list[dict[str, Any]]:
    return [{"coding": [{"system": OBSERVATION_CATEGORY, "code": code}]}]


def _observation(
    resource_id: str,
    code: tuple[str, str],
    category: str,
    subject: str,
    order: str,
    effective: str,
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": resource_id,
        "status": "final",
        "category": _category(category),
        "code": {
            "coding": [{"system": LOINC, "code": code[0], "display": code[1]}],
            "text": code[1],
        },
        "subject": {"reference": f"urn:uuid:{subject}"},
        "basedOn": [{"reference": f"urn:uuid:{order}"}],
        "effectiveDateTime": effective,
    }


def fhir_bundle(
    record: EmrRecord,
    *,
    seed: int,
    index: int,
    patient_name: tuple[str, str],
    study_instance_uid: str,
) -> dict[str, Any]:
    """Build a FHIR R4 collection Bundle with the record as Observations.

    The Bundle contains a Patient (identifier = DICOM PatientID), a ServiceRequest for the
    radiograph (identifier of type ACSN = DICOM AccessionNumber), an ImagingStudy
    (identifier = StudyInstanceUID) and one LOINC-coded Observation per EMR value.
    Every Observation references the Patient as subject and the ServiceRequest in
    ``basedOn``. Resource ids are uuid5 values of (seed, index, role), so the same
    inputs give the same Bundle.
    """
    patient = _resource_id(seed, index, "patient")
    order = _resource_id(seed, index, "service-request")
    study = _resource_id(seed, index, "imaging-study")
    effective = (
        f"{record.study_date[:4]}-{record.study_date[4:6]}-{record.study_date[6:]}"
    )
    resources: list[dict[str, Any]] = [
        {
            "resourceType": "Patient",
            "id": patient,
            "identifier": [{"system": PATIENT_ID_SYSTEM, "value": record.patient_id}],
            "name": [{"family": patient_name[0], "given": [patient_name[1]]}],
            "gender": "male" if record.sex == "M" else "female",
        },
        {
            "resourceType": "ServiceRequest",
            "id": order,
            "identifier": [
                {
                    "type": {"coding": [{"system": IDENTIFIER_TYPE, "code": "ACSN"}]},
                    "system": ACCESSION_SYSTEM,
                    "value": record.accession_number,
                }
            ],
            "status": "completed",
            "intent": "order",
            "code": {"text": "Chest radiograph, single view"},
            "subject": {"reference": f"urn:uuid:{patient}"},
        },
        {
            "resourceType": "ImagingStudy",
            "id": study,
            "identifier": [
                {"system": "urn:dicom:uid", "value": f"urn:oid:{study_instance_uid}"}
            ],
            "status": "available",
            "subject": {"reference": f"urn:uuid:{patient}"},
            "basedOn": [{"reference": f"urn:uuid:{order}"}],
            "started": effective,
        },
    ]
    for spec in QUANTITIES:
        observation = _observation(
            _resource_id(seed, index, spec.column),
            (spec.loinc, spec.display),
            spec.category,
            patient,
            order,
            effective,
        )
        observation["valueQuantity"] = {
            "value": getattr(record, spec.column),
            "unit": spec.unit,
            "system": UCUM,
            "code": spec.ucum,
        }
        resources.append(observation)
    smoking = _observation(
        _resource_id(seed, index, "smoking_status"),
        SMOKING_LOINC,
        "social-history",
        patient,
        order,
        effective,
    )
    code, display = SMOKING_SNOMED[record.smoking_status]
    smoking["valueCodeableConcept"] = {
        "coding": [
            {"system": "http://snomed.info/sct", "code": code, "display": display}
        ]
    }
    resources.append(smoking)
    return {
        "resourceType": "Bundle",
        "id": _resource_id(seed, index, "bundle"),
        "type": "collection",
        "entry": [
            {"fullUrl": f"urn:uuid:{resource['id']}", "resource": resource}
            for resource in resources
        ],
    }
