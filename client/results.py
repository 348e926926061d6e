"""Typed results of a real-time query: scores per instance and study, and timings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class QueryTiming:
    """Milliseconds spent on one query, measured by the client and the server.

    ``infer_ms`` is the ONNX Runtime time that the Python-backend host reports in its
    ``compute_ms`` output, or None when the model has no such output. It covers the
    whole execution, which may include requests that the dynamic batcher merged with
    this one. ``queue_ms`` is the gRPC round trip minus ``infer_ms``: Triton's queue
    wait plus serialisation, loopback or network transfer and the backend's process
    hop. ``total_ms`` runs from the call of ``query`` to the built result, so a
    client's first query includes reading the model metadata.
    """

    preprocess_ms: float
    round_trip_ms: float
    queue_ms: float | None
    infer_ms: float | None
    total_ms: float


@dataclass(frozen=True)
class InstanceScore:
    """Score of one DICOM instance: the maximum positive-class probability of its
    frames."""

    path: str
    sop_instance_uid: str
    series_instance_uid: str
    num_frames: int
    label: str
    score: float
    scores: dict[str, float]
    frame_scores: list[float]
    preprocessing: dict[str, Any]


@dataclass(frozen=True)
class SkippedFile:
    """A file of a queried folder that was not scored, with its reason code."""

    path: str
    reason: str
    message: str


@dataclass(frozen=True)
class QueryResult:
    """Result of one real-time query of one study."""

    study_instance_uid: str
    model_name: str
    triton_model: str
    """The Triton model that ran the request: ``model_name`` or its real-time twin."""
    model_version: str
    model_sha256: str
    model_training: str
    labels: tuple[str, ...]
    threshold: float
    label: str
    score: float
    instances: list[InstanceScore]
    timing: QueryTiming
    server_url: str
    priority: int
    emr_used: bool
    emr_note: str
    skipped: list[SkippedFile] = field(default_factory=list)
    saliency: np.ndarray | None = None
    """Per-frame heatmaps from the model's ``saliency`` output, else None."""

    def to_dict(self) -> dict[str, Any]:
        """Convert the result into JSON-serialisable types.

        Returns
        -------
        dict
            Every field; ``saliency`` becomes nested lists or None.
        """
        data = asdict(self)
        data["labels"] = list(self.labels)
        data["saliency"] = None if self.saliency is None else self.saliency.tolist()
        return data
