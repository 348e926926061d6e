"""The model result that the DICOM Structured Report and Secondary Capture record."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ModelResult:
    """One model's output for one study, with the model's identity.

    ``score`` is the positive-class probability, and ``label`` is ``"positive"``
    when ``score >= threshold``, else ``"negative"``. ``model_version`` is the
    version string shown to readers (a Triton version number or the first 12 hex
    digits of ``weights_sha256``), and ``weights_sha256`` identifies the weights
    exactly.
    """

    model_name: str
    model_version: str
    weights_sha256: str
    score: float
    threshold: float
    label: str

    def __post_init__(self) -> None:
        if not self.model_name or not self.model_version:
            raise ValueError(
                "ModelResult needs a non-empty model_name and model_version"
            )
        if not _SHA256.match(self.weights_sha256):
            raise ValueError(
                f"ModelResult.weights_sha256 must be 64 lower-case hex digits, got "
                f"{self.weights_sha256!r}"
            )
        for name in ("score", "threshold"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"ModelResult.{name} must be in [0, 1], got {value!r}")
        expected = "positive" if self.score >= self.threshold else "negative"
        if self.label != expected:
            raise ValueError(
                f"ModelResult.label is {self.label!r}, but score {self.score} and "
                f"threshold {self.threshold} give {expected!r}"
            )

    @classmethod
    def from_score(
        cls,
        *,
        model_name: str,
        model_version: str,
        weights_sha256: str,
        score: float,
        threshold: float,
    ) -> ModelResult:
        """Build a result whose label follows from ``score >= threshold``.

        Raises
        ------
        ValueError
            If a field is empty or out of range (see the class docstring).
        """
        label = "positive" if score >= threshold else "negative"
        return cls(
            model_name=model_name,
            model_version=model_version,
            weights_sha256=weights_sha256,
            score=float(score),
            threshold=float(threshold),
            label=label,
        )

    @property
    def positive(self) -> bool:
        """Whether the label is positive."""
        return self.label == "positive"
