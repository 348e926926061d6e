"""Write a model result as a DICOM Enhanced SR with a TID 1500 Measurement Report."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, generate_uid

from clinfer.dicom_out.result import ModelResult
from clinfer.errors import DicomOutputError

logger = logging.getLogger(__name__)

MANUFACTURER = "clinfer"
SR_SERIES_NUMBER = 9001
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"

# Standard codes (pydicom 3.0.2 code dictionary), so no private coding scheme is
# needed: the score is a DCM "Probability", the operating point a DCM "Threshold
# Value" and the decision an SCT "Classification" valued SCT Positive or Negative.
# DCM "Finding" would be read back by highdicom as the group's finding type.
SCORE_CODE = codes.DCM.Probability
THRESHOLD_CODE = codes.DCM.ThresholdValue
DECISION_CODE = codes.SCT.Classification
PROCEDURE_CODE = codes.SCT.ChestImaging
FINDING_SITE_CODE = codes.SCT.Chest
UNITLESS = codes.UCUM.NoUnits


def uid_hash(uid: str) -> str:
    """Return a 12-digit SHA-256 prefix of a UID, for logs that must not carry it."""
    return hashlib.sha256(uid.encode("ascii")).hexdigest()[:12]


def derived_uid(result: ModelResult, source_uid: str, role: str) -> UID:
    """Return a UID fixed by the source UID, the model weights and the object role.

    Writing the same result for the same source again gives the same UID, so a
    rerun replaces an earlier object instead of adding a second one to the study.
    """
    return generate_uid(
        entropy_srcs=["clinfer", role, source_uid, result.weights_sha256]
    )


def series_description(result: ModelResult, kind: str) -> str:
    """Return a SeriesDescription (LO, at most 64 characters) naming the model."""
    text = (
        f"{kind} {result.model_name} v{result.model_version} {NOT_FOR_DIAGNOSTIC_USE}"
    )
    return text[:64]


def check_same_study(source_datasets: Sequence[Dataset]) -> str:
    """Return the StudyInstanceUID that all source datasets share.

    Raises
    ------
    DicomOutputError
        If the sequence is empty, a dataset has no StudyInstanceUID or
        SOPInstanceUID, or the datasets belong to different studies.
    """
    if not source_datasets:
        raise DicomOutputError(
            "no source datasets given; pass the instances of the scored study"
        )
    studies = set()
    for index, ds in enumerate(source_datasets):
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if not ds.get(keyword):
                raise DicomOutputError(
                    f"source dataset {index} has no {keyword}; pass the instances "
                    "as read from their DICOM files"
                )
        studies.add(str(ds.StudyInstanceUID))
    if len(studies) > 1:
        raise DicomOutputError(
            f"the {len(source_datasets)} source datasets belong to {len(studies)} "
            "studies; write one report per study"
        )
    return studies.pop()


def _measurement_report(
    source_datasets: Sequence[Dataset], result: ModelResult, study_uid: str
) -> hd.sr.MeasurementReport:
    algorithm = hd.sr.AlgorithmIdentification(
        name=result.model_name,
        version=result.model_version,
        parameters=[f"weights_sha256={result.weights_sha256}"],
        manufacturer=MANUFACTURER,
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid(result, study_uid, "device-observer"),
            name=result.model_name,
            manufacturer_name=MANUFACTURER,
            model_name=f"{result.model_name} {result.model_version}",
        ),
    )
    measurements = [
        hd.sr.Measurement(
            name=SCORE_CODE,
            value=result.score,
            unit=UNITLESS,
            algorithm_id=algorithm,
        ),
        hd.sr.Measurement(
            name=THRESHOLD_CODE,
            value=result.threshold,
            unit=UNITLESS,
            algorithm_id=algorithm,
        ),
    ]
    decision = codes.SCT.Positive if result.positive else codes.SCT.Negative
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(result, study_uid, "tracking"),
            identifier=f"{result.model_name} study-level finding",
        ),
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=FINDING_SITE_CODE)],
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=DECISION_CODE, value=decision)
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)
            for ds in source_datasets
        ],
    )
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_CODE,
        imaging_measurements=[group],
    )


def build_structured_report(
    source_datasets: Sequence[Dataset], result: ModelResult
) -> hd.sr.EnhancedSR:
    """Build an Enhanced SR that records ``result`` for the study of the sources.

    The content is a TID 1500 Imaging Measurement Report with one measurement
    group: the score (DCM Probability) and threshold (DCM Threshold Value), both
    with TID 4019 Algorithm Identification naming the model, its version and
    ``weights_sha256=...``. The decision is a qualitative evaluation (SCT
    Classification = SCT Positive or Negative). Every source instance is a source
    image of the group and is listed in the Current Requested Procedure Evidence
    Sequence. Patient and study attributes are copied from the first source. The Enhanced SR
    IOD suffices because the report has no 3-D spatial coordinates.

    Raises
    ------
    DicomOutputError
        If the sources are empty, lack UIDs, come from several studies, or
        highdicom rejects the content.
    """
    study_uid = check_same_study(source_datasets)
    try:
        report = _measurement_report(source_datasets, result, study_uid)
        sr = hd.sr.EnhancedSR(
            evidence=list(source_datasets),
            content=report,
            series_instance_uid=derived_uid(result, study_uid, "sr-series"),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=derived_uid(result, study_uid, "sr-instance"),
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            series_description=series_description(result, "SR"),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise DicomOutputError(
            f"highdicom rejected the structured report of study "
            f"{uid_hash(study_uid)} for model {result.model_name}: {exc}"
        ) from exc
    return sr


def write_structured_report(
    source_datasets: Sequence[Dataset], result: ModelResult, out_path: Path
) -> Path:
    """Write the Enhanced SR of ``build_structured_report`` to ``out_path``.

    Parameters
    ----------
    source_datasets
        The scored instances of one study, as read by pydicom (pixel data not
        needed).
    result
        The model result and identity.
    out_path
        File to write; its folder is created.

    Returns
    -------
    pathlib.Path
        ``out_path``.

    Raises
    ------
    DicomOutputError
        If the report cannot be built (see ``build_structured_report``) or
        written.
    """
    sr = build_structured_report(source_datasets, result)
    out_path = Path(out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        sr.save_as(out_path, enforce_file_format=True)
    except OSError as exc:
        raise DicomOutputError(
            f"writing the structured report to {out_path} failed: {exc}; check "
            "that the folder is writable"
        ) from exc
    logger.debug(
        "Wrote SR for study %s, model %s v%s, to %s",
        uid_hash(str(sr.StudyInstanceUID)),
        result.model_name,
        result.model_version,
        out_path,
    )
    return out_path
