"""Export the bundled chest-radiograph classifier into a model repository."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clinfer.export.models import build_untrained_cxr_model
from clinfer.export.onnx_export import (
    DEFAULT_TOLERANCE,
    ParityReport,
    check_parity,
    export_onnx,
)
from clinfer.export.repository import TritonConfigOptions, publish_version

from clinfer import __version__

logger = logging.getLogger(__name__)

CXR_MODEL_NAME = "cxr_resnet"
INPUT_SIZE = 224

UNTRAINED_NOTE = (
    "UNTRAINED: weights are seeded random values (seed {seed}); the scores carry no "
    "clinical meaning and exist to exercise decoding, preprocessing and serving."
)


def cxr_spec(seed: int) -> dict[str, Any]:
    """Return the clinfer spec of the chest-radiograph classifier."""
    return {
        "schema": 1,
        "name": CXR_MODEL_NAME,
        "task": "chest radiograph classification: normal vs abnormal",
        "architecture": "ResNet-18 layout, widths 16-32-64-128, one input channel",
        "labels": ["normal", "abnormal"],
        "positive_label": "abnormal",
        "threshold": 0.5,
        "input": {
            "name": "image",
            "channels": 1,
            "height": INPUT_SIZE,
            "width": INPUT_SIZE,
            "range": [0.0, 1.0],
        },
        "output": {"name": "probabilities", "kind": "softmax"},
        # Every single-channel image is accepted, one model input per frame or slice,
        # so that the whole test corpus exercises decoding and preprocessing.
        "accepts": {
            "modalities": ["*"],
            "photometric_interpretations": ["MONOCHROME1", "MONOCHROME2"],
            "samples_per_pixel": [1],
        },
        "training": {
            "status": "untrained",
            "seed": seed,
            "note": UNTRAINED_NOTE.format(seed=seed),
        },
    }


@dataclass(frozen=True)
class ExportResult:
    name: str
    version: int
    created: bool
    parity: ParityReport
    repository: Path


def export_cxr_model(
    repository: Path,
    *,
    seed: int = 0,
    tolerance: float = DEFAULT_TOLERANCE,
    options: TritonConfigOptions | None = None,
) -> ExportResult:
    """Build, export, parity-check and publish the chest-radiograph classifier.

    Raises
    ------
    clinfer.errors.ParityError
        If ONNX Runtime disagrees with PyTorch beyond ``tolerance``; nothing is published.
    """
    spec = cxr_spec(seed)
    model = build_untrained_cxr_model(seed)
    shape = (1, INPUT_SIZE, INPUT_SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(model, onnx_path, input_shape=shape)
        parity = check_parity(model, onnx_path, input_shape=shape, tolerance=tolerance)
        info = {
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "clinfer_version": __version__,
            "parity_max_abs_diff": parity.max_abs_diff,
            "parity_tolerance": tolerance,
            "training_status": "untrained",
        }
        version, created = publish_version(
            repository,
            spec,
            onnx_path,
            version_info=info,
            options=options or TritonConfigOptions(),
        )
    return ExportResult(CXR_MODEL_NAME, version, created, parity, repository)
