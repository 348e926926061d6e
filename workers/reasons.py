"""Outcome and reason codes for files that are not scored.

A file that is not scored ends in the failures table with an outcome and a reason.
``failed`` means the file should have been scored but could not be, which is an
error to fix. ``skipped`` means the file is not something this model scores.
"""

from __future__ import annotations

FAILED = "failed"
SKIPPED = "skipped"

# Failed: the input is broken or could not be processed.
NOT_DICOM = "not_dicom"
EMPTY_FILE = "empty_file"
TRUNCATED = "truncated"
INVALID_DICOM = "invalid_dicom"
MISSING_UID = "missing_uid"
NO_PIXEL_DATA = "no_pixel_data"
UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
DECODE_FAILED = "decode_failed"
PREPROCESS_FAILED = "preprocess_failed"
INFERENCE_FAILED = "inference_failed"
# The study's EMR row has a value that does not parse or is out of range.
INVALID_EMR = "invalid_emr"

# Skipped: valid input that this job or model does not score.
DICOMDIR = "dicomdir"
NON_DICOM_FILE = "non_dicom_file"
MODALITY_NOT_ACCEPTED = "modality_not_accepted"
IMAGE_TYPE_NOT_ACCEPTED = "image_type_not_accepted"
DUPLICATE_INSTANCE = "duplicate_instance"
NON_IMAGE_OBJECT = "non_image_object"

FAILED_REASONS = frozenset(
    {
        NOT_DICOM,
        EMPTY_FILE,
        TRUNCATED,
        INVALID_DICOM,
        MISSING_UID,
        NO_PIXEL_DATA,
        INVALID_EMR,
        UNSUPPORTED_TRANSFER_SYNTAX,
        DECODE_FAILED,
        PREPROCESS_FAILED,
        INFERENCE_FAILED,
    }
)
SKIPPED_REASONS = frozenset(
    {
        DICOMDIR,
        NON_DICOM_FILE,
        MODALITY_NOT_ACCEPTED,
        IMAGE_TYPE_NOT_ACCEPTED,
        DUPLICATE_INSTANCE,
        NON_IMAGE_OBJECT,
    }
)


def outcome_of(reason: str) -> str:
    """Return ``failed`` or ``skipped`` for a reason code."""
    if reason in FAILED_REASONS:
        return FAILED
    if reason in SKIPPED_REASONS:
        return SKIPPED
    raise ValueError(f"unknown reason code {reason!r}")
