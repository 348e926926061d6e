"""Exception hierarchy of clinfer.

Errors from tritonclient, grpc, pydicom and Ray are translated into these types at
the boundary, with the original error chained as ``__cause__``::

    ClinferError
    ├── ConfigurationError       invalid option, missing environment or file
    ├── ServerError              Triton could not be started or reached
    │   └── ServerNotReadyError  the server or the model did not become ready in time
    ├── InferenceError           Triton rejected or failed an inference request
    ├── ModelSpecError           a model's clinfer spec is missing or invalid
    ├── ExportError              an export failed
    │   └── ParityError          the exported model disagrees with the PyTorch model
    ├── DicomInputError          a DICOM file could not be read, decoded or accepted
    ├── DicomOutputError         a DICOM SR or Secondary Capture could not be written
    └── ValidationError          a model could not be validated on its data
"""

from __future__ import annotations


class ClinferError(Exception):
    """Base class of every error clinfer raises on purpose."""


class ConfigurationError(ClinferError):
    """An option, environment or required file is invalid or missing."""


class ServerError(ClinferError):
    """The Triton server could not be started, reached or stopped."""


class ServerNotReadyError(ServerError):
    """The Triton server or a model on it did not become ready in time."""


class InferenceError(ClinferError):
    """Triton rejected or failed an inference request."""


class ModelSpecError(ClinferError):
    """A model's clinfer spec (stored in its Triton config) is missing or invalid."""


class ExportError(ClinferError):
    """Exporting a model to ONNX or to the model repository failed."""


class ParityError(ExportError):
    """An exported model's outputs differ from the PyTorch model beyond tolerance."""

    def __init__(self, message: str, *, max_abs_diff: float, tolerance: float):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance


class DicomInputError(ClinferError):
    """A DICOM file could not be read, decoded or accepted.

    ``reason`` is a short machine-readable code (see ``clinfer.workers.reasons``), and
    the message names the file, what was wrong and what to do next.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class DicomOutputError(ClinferError):
    """A DICOM Structured Report or Secondary Capture could not be built or written."""


class ValidationError(ClinferError):
    """A model could not be validated: missing predictions, labels or cohort data."""


class ServerUnavailableError(ServerError):
    """No Triton server of a query's URL list could be reached."""


class QueryError(ClinferError):
    """A real-time query was invalid or its result could not be built."""


class EmrInputError(QueryError):
    """The EMR record given with a query is invalid; the message names the value."""
