"""Generate a synthetic multimodal cohort: chest radiograph DICOM files plus an EMR.

Everything in a cohort is synthetic and carries no information about real people:

* Images are phantoms (``clinfer.train.phantom``): a body outline, lungs, heart,
  spine, ribs, texture and noise, with nodules or opacities drawn into the lungs of
  about half of the patients. They are not derived from any radiograph.
* DICOM headers (``clinfer.train.synthetic_dicom``) are CR or DX with made-up
  vendors, obviously fake names (``SYNTHETIC^PATIENT0001``) and identifiers
  (PatientID ``SYNP...``, AccessionNumber ``SYNA...``) and UIDs under the pydicom
  root, all derived from the seed with ``pydicom.uid.generate_uid(entropy_srcs=...)``.
  PatientComments states that the file is synthetic.
* EMR values (``clinfer.train.emr``) are independent draws from plausible ranges,
  written as ``emr.csv`` and as one FHIR R4 Bundle per patient under ``fhir/``.
* The label is synthetic: ``label = finding_present and emr_risk_score > 0``, where
  the risk score is a fixed function of the recorded EMR values. Neither modality
  alone determines it, so a model that fuses both can outperform either one.

A cohort folder contains ``manifest.json`` (``CohortManifest``), ``emr.csv``,
``dicom/patientNNNN.dcm``, ``fhir/patientNNNN.json`` and, for patients with findings,
``masks/patientNNNN.png`` (255 inside a finding). Patient ``i`` depends only on the
seed and ``i``: its random draws come from ``numpy.random.SeedSequence([seed, i])``
and its identifiers from ``generate_uid``. So the same seed and library versions give
the same files byte for byte, and a larger cohort starts with the patients of a
smaller one (while both have under 10 000 patients, so that numbers have 4 digits).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.uid import UID, generate_uid

from clinfer import __version__
from clinfer.errors import ConfigurationError
from clinfer.train.emr import (
    EMR_FEATURES,
    EmrRecord,
    emr_risk_score,
    fhir_bundle,
    sample_emr,
    write_emr_csv,
)
from clinfer.train.phantom import Finding, synthesize_chest
from clinfer.train.synthetic_dicom import (
    TRANSFER_SYNTAXES,
    CohortError,
    ImageSettings,
    StudyIdentity,
    build_dataset,
    stored_values,
    write_dicom,
)

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
EMR_CSV_NAME = "emr.csv"
MANIFEST_SCHEMA = 1

LABEL_RULE = "label = finding_present and emr_risk_score > 0"
SPLIT_RULE = (
    "int(sha256(PatientID).hexdigest(), 16) % 10: 0-5 train, 6-7 validation, 8-9 test"
)
SPLITS = ("train", "validation", "test")

# (Manufacturer, ManufacturerModelName): invented vendors.
VENDORS = (
    ("Acme Synthetic Radiography", "ACME-DR 1000"),
    ("Placebo Imaging Systems", "PlaceboCR 7"),
    ("Mockwell Medical", "MW Digital Chest"),
)
# (Rows, Columns): portrait and square sizes of a downsampled chest detector.
IMAGE_SIZES = ((256, 256), (320, 256), (384, 320), (352, 288), (320, 320))
DETECTOR_SIZE_MM = 430.0
FIRST_STUDY_DATE = dt.date(2024, 1, 1)


@dataclass(frozen=True)
class PatientRecord:
    """One patient of the manifest: identifiers, files, image settings and truth.

    Paths are relative to the cohort folder. ``findings`` boxes are in stored-pixel
    coordinates of the DICOM image.
    """

    index: int
    patient_id: str
    accession_number: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    dicom_path: str
    fhir_path: str
    mask_path: str | None
    modality: str
    view_position: str
    manufacturer: str
    photometric_interpretation: str
    bits_stored: int
    rows: int
    columns: int
    voi: str
    transfer_syntax_uid: str
    pixel_sha256: str
    findings: tuple[Finding, ...]
    finding_present: bool
    emr_risk_score: float
    emr_risk_high: bool
    label: int
    split: str


@dataclass(frozen=True)
class CohortManifest:
    """Contents of ``manifest.json``, plus the folder it was read from or written to."""

    seed: int
    n: int
    patients: tuple[PatientRecord, ...]
    root: Path = field(compare=False)

    def to_json_dict(self) -> dict[str, Any]:
        """Return the manifest as JSON-serialisable data (without ``root``)."""
        return {
            "schema": MANIFEST_SCHEMA,
            "generator": "clinfer.train.cohort",
            "clinfer_version": __version__,
            "synthetic": True,
            "seed": self.seed,
            "n": self.n,
            "label_rule": LABEL_RULE,
            "split_rule": SPLIT_RULE,
            "emr_csv": EMR_CSV_NAME,
            "emr_features": list(EMR_FEATURES),
            "transfer_syntaxes": sorted({p.transfer_syntax_uid for p in self.patients}),
            "patients": [asdict(patient) for patient in self.patients],
        }

    def path_of(self, relative: str) -> Path:
        """Return the absolute path of a file named in the manifest."""
        return self.root / relative

    def split(self, name: str) -> tuple[PatientRecord, ...]:
        """Return the patients of split ``name`` in index order.

        Raises
        ------
        ValueError
            If ``name`` is not train, validation or test.
        """
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return tuple(patient for patient in self.patients if patient.split == name)

    @classmethod
    def load(cls, cohort_dir: Path) -> CohortManifest:
        """Read ``manifest.json`` of a cohort folder.

        Raises
        ------
        ConfigurationError
            If the manifest is missing, is not valid JSON or has another schema.
        """
        path = Path(cohort_dir) / MANIFEST_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigurationError(
                f"{path} not found; generate a cohort with `clinfer cohort --out "
                f"{cohort_dir}` first"
            ) from exc
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"{path} is not valid JSON: {exc}") from exc
        if data.get("schema") != MANIFEST_SCHEMA:
            raise ConfigurationError(
                f"{path} has manifest schema {data.get('schema')!r}, expected "
                f"{MANIFEST_SCHEMA}; regenerate the cohort with this clinfer version"
            )
        patients = []
        for item in data["patients"]:
            findings = tuple(
                Finding(**{**finding, "box": tuple(finding["box"])})
                for finding in item["findings"]
            )
            patients.append(PatientRecord(**{**item, "findings": findings}))
        return cls(
            seed=data["seed"],
            n=data["n"],
            patients=tuple(patients),
            root=Path(cohort_dir),
        )


def split_of(patient_id: str) -> str:
    """Return the split of a patient by ``SPLIT_RULE``."""
    bucket = int(hashlib.sha256(patient_id.encode("ascii")).hexdigest(), 16) % 10
    if bucket < 6:
        return "train"
    if bucket < 8:
        return "validation"
    return "test"


def _uid(seed: int, index: int, role: str) -> UID:
    return generate_uid(
        entropy_srcs=["clinfer synthetic cohort", str(seed), str(index), role]
    )


def _short_id(prefix: str, seed: int, index: int, role: str, used: set[str]) -> str:
    """Return ``prefix`` plus 12 UID-derived digits, unique within ``used``."""
    attempt = 0
    while True:
        digits = _uid(seed, index, f"{role}/{attempt}").rsplit(".", 1)[-1][-12:]
        candidate = f"{prefix}{digits.zfill(12)}"
        if candidate not in used:
            used.add(candidate)
            return candidate
        attempt += 1


def _sample_settings(
    rng: np.random.Generator, index: int, rows: int, columns: int
) -> ImageSettings:
    modality = "CR" if rng.uniform() < 0.55 else "DX"
    manufacturer, model_name = VENDORS[int(rng.integers(len(VENDORS)))]
    voi = "voi_lut" if rng.uniform() < 0.3 else "window"
    slope, intercept = 1.0, 0.0
    # DX requires slope 1 and intercept 0 (PS3.3 C.8.11.3), and a VOI LUT needs
    # integer modality values, so only windowed CR images get another rescale.
    if modality == "CR" and voi == "window":
        slope = float(rng.choice([0.5, 1.0, 2.0]))
        intercept = float(rng.choice([0.0, -1024.0, 512.0]))
    photometric = "MONOCHROME1" if rng.uniform() < 0.35 else "MONOCHROME2"
    function_draw = rng.uniform()
    function = None
    if function_draw >= 0.8:
        function = "SIGMOID"
    elif function_draw >= 0.6:
        function = "LINEAR"
    return ImageSettings(
        modality=modality,
        view_position="PA" if rng.uniform() < 0.7 else "AP",
        manufacturer=manufacturer,
        model_name=model_name,
        photometric_interpretation=photometric,
        bits_stored=int(rng.integers(12, 17)),
        rescale_slope=slope,
        rescale_intercept=intercept,
        voi=voi,
        voi_lut_function=function if voi == "window" else None,
        window_low=round(float(rng.uniform(-0.03, 0.06)), 4),
        window_high=round(float(rng.uniform(0.94, 1.03)), 4),
        voi_lut_gamma=round(float(rng.uniform(0.8, 1.25)), 4),
        voi_lut_bits=int(rng.choice([12, 16])),
        transfer_syntax_uid=str(TRANSFER_SYNTAXES[index % len(TRANSFER_SYNTAXES)]),
        pixel_spacing_mm=DETECTOR_SIZE_MM / max(rows, columns),
    )


def _identity(
    rng: np.random.Generator,
    seed: int,
    index: int,
    width: int,
    used_ids: set[str],
) -> StudyIdentity:
    date = FIRST_STUDY_DATE + dt.timedelta(days=int(rng.integers(0, 366)))
    seconds = int(rng.integers(7 * 3600, 19 * 3600))
    age = int(np.clip(round(rng.normal(62.0, 14.0)), 25, 95))
    return StudyIdentity(
        patient_id=_short_id("SYNP", seed, index, "patient-id", used_ids),
        patient_name=f"SYNTHETIC^PATIENT{index + 1:0{width}d}",
        patient_sex="M" if rng.uniform() < 0.5 else "F",
        patient_age=f"{age:03d}Y",
        accession_number=_short_id("SYNA", seed, index, "accession-number", used_ids),
        study_instance_uid=_uid(seed, index, "study"),
        series_instance_uid=_uid(seed, index, "series"),
        sop_instance_uid=_uid(seed, index, "instance"),
        study_date=date.strftime("%Y%m%d"),
        study_time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
    )


def _write_patient(
    seed: int, index: int, width: int, out_dir: Path, used_ids: set[str]
) -> tuple[PatientRecord, EmrRecord]:
    settings_seq, image_seq, emr_seq = np.random.SeedSequence([seed, index]).spawn(3)
    settings_rng = np.random.default_rng(settings_seq)
    rows, columns = IMAGE_SIZES[int(settings_rng.integers(len(IMAGE_SIZES)))]
    settings = _sample_settings(settings_rng, index, rows, columns)
    identity = _identity(settings_rng, seed, index, width, used_ids)

    image_rng = np.random.default_rng(image_seq)
    finding_count = 0
    if image_rng.uniform() < 0.5:
        finding_count = 1 if image_rng.uniform() < 0.75 else 2
    phantom = synthesize_chest(image_rng, rows, columns, finding_count)
    pixels = stored_values(phantom.brightness, settings)

    stem = f"patient{index + 1:0{width}d}"
    dicom_path = f"dicom/{stem}.dcm"
    ds = build_dataset(identity, settings, pixels)
    write_dicom(ds, pixels, out_dir / dicom_path, UID(settings.transfer_syntax_uid))

    mask_path = None
    if phantom.findings:
        mask_path = f"masks/{stem}.png"
        Image.fromarray(phantom.mask.astype(np.uint8) * 255).save(out_dir / mask_path)

    emr = sample_emr(
        np.random.default_rng(emr_seq),
        patient_id=identity.patient_id,
        accession_number=identity.accession_number,
        study_date=identity.study_date,
        age_years=int(identity.patient_age[:3]),
        sex=identity.patient_sex,
    )
    fhir_path = f"fhir/{stem}.json"
    family, given_name = identity.patient_name.split("^")
    bundle = fhir_bundle(
        emr,
        seed=seed,
        index=index,
        patient_name=(family, given_name),
        study_instance_uid=identity.study_instance_uid,
    )
    (out_dir / fhir_path).write_text(json.dumps(bundle, indent=1), encoding="utf-8")

    risk = emr_risk_score(emr)
    finding_present = bool(phantom.findings)
    record = PatientRecord(
        index=index,
        patient_id=identity.patient_id,
        accession_number=identity.accession_number,
        study_instance_uid=identity.study_instance_uid,
        series_instance_uid=identity.series_instance_uid,
        sop_instance_uid=identity.sop_instance_uid,
        dicom_path=dicom_path,
        fhir_path=fhir_path,
        mask_path=mask_path,
        modality=settings.modality,
        view_position=settings.view_position,
        manufacturer=settings.manufacturer,
        photometric_interpretation=settings.photometric_interpretation,
        bits_stored=settings.bits_stored,
        rows=rows,
        columns=columns,
        voi=settings.voi,
        transfer_syntax_uid=settings.transfer_syntax_uid,
        pixel_sha256=hashlib.sha256(pixels.tobytes()).hexdigest(),
        findings=phantom.findings,
        finding_present=finding_present,
        emr_risk_score=risk,
        emr_risk_high=risk > 0.0,
        label=int(finding_present and risk > 0.0),
        split=split_of(identity.patient_id),
    )
    return record, emr


def generate_cohort(n: int, out_dir: Path, *, seed: int) -> CohortManifest:
    """Write a synthetic cohort of ``n`` patients into ``out_dir``.

    Each patient gets one chest radiograph, an EMR row and a FHIR Bundle. The
    radiograph is CR or DX, PA or AP, MONOCHROME1 or MONOCHROME2, with BitsStored 12
    to 16, a rescale and a window or VOI LUT. Patient ``i`` is encoded in
    ``TRANSFER_SYNTAXES[i % 5]`` and verified by decoding the file again. See the
    module docstring for what is synthetic and for the label.

    Parameters
    ----------
    n
        Number of patients, at least 1.
    out_dir
        Folder to create. It must be missing or empty, so that no stale files of
        another cohort remain in it.
    seed
        Non-negative seed; the same seed gives identical files.

    Returns
    -------
    CohortManifest
        The manifest, also written to ``out_dir/manifest.json``.

    Raises
    ------
    ValueError
        If ``n`` < 1 or ``seed`` < 0.
    ConfigurationError
        If ``out_dir`` exists and is not an empty folder.
    CohortError
        If a DICOM file cannot be encoded or does not decode to the encoded pixels.
    """
    if n < 1:
        raise ValueError(f"cohort size n must be at least 1, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigurationError(
            f"cohort folder {out_dir} already exists and is not an empty folder; "
            "choose a new folder or remove it"
        )
    for sub in ("dicom", "fhir", "masks"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    logger.info("Generating a synthetic cohort of %d patients (seed %d)", n, seed)
    width = max(4, len(str(n)))
    used_ids: set[str] = set()
    patients: list[PatientRecord] = []
    emr_rows: list[EmrRecord] = []
    for index in range(n):
        record, emr = _write_patient(seed, index, width, out_dir, used_ids)
        patients.append(record)
        emr_rows.append(emr)

    write_emr_csv(emr_rows, out_dir / EMR_CSV_NAME)
    manifest = CohortManifest(seed=seed, n=n, patients=tuple(patients), root=out_dir)
    (out_dir / MANIFEST_NAME).write_text(
        json.dumps(manifest.to_json_dict(), indent=1), encoding="utf-8"
    )
    positives = sum(patient.label for patient in patients)
    logger.info(
        "Wrote %d patients (%d positive) to %s in %.1f s",
        n,
        positives,
        out_dir,
        time.perf_counter() - start,
    )
    return manifest


__all__ = [
    "CohortError",
    "CohortManifest",
    "PatientRecord",
    "generate_cohort",
    "split_of",
]
