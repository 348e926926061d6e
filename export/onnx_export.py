"""Export PyTorch models to ONNX and check ONNX Runtime parity against PyTorch."""

from __future__ import annotations

import logging
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from clinfer.errors import ExportError, ParityError

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4
OPSET = 17


@dataclass(frozen=True)
class ParityReport:
    """Largest absolute output difference between ONNX Runtime and PyTorch."""

    max_abs_diff: float
    tolerance: float
    batch_sizes: tuple[int, ...]
    seed: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def export_onnx(
    model: torch.nn.Module,
    path: Path,
    *,
    input_shape: tuple[int, ...],
    input_name: str = "image",
    output_name: str = "probabilities",
) -> None:
    """Write ``model`` to ``path`` as ONNX with a dynamic batch axis.

    ``input_shape`` excludes the batch axis, for example ``(1, 224, 224)``.

    Raises
    ------
    ExportError
        If torch.onnx fails or the written file does not pass ``onnx.checker``.
    """
    model.eval()
    example = torch.zeros((2, *input_shape), dtype=torch.float32)
    try:
        with warnings.catch_warnings():
            # torch 2.9+ deprecates the TorchScript-based exporter in favour of the
            # dynamo one, which needs onnxscript; the TorchScript exporter still exports
            # this model exactly.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=[input_name],
                output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(
            f"exporting {type(model).__name__} to {path} failed: {exc}"
        ) from exc


def check_parity(
    model: torch.nn.Module,
    onnx_path: Path,
    *,
    input_shape: tuple[int, ...],
    tolerance: float = DEFAULT_TOLERANCE,
    batch_sizes: tuple[int, ...] = (1, 3, 8),
    seed: int | None = None,
) -> ParityReport:
    """Compare ONNX Runtime with PyTorch on fresh random inputs in [0, 1].

    A new random seed is drawn for every call unless ``seed`` is given, so repeated
    exports are checked on different inputs. The seed is reported so that a failure can
    be reproduced.

    Raises
    ------
    ParityError
        If the largest absolute difference over all outputs exceeds ``tolerance``.
    """
    seed = secrets.randbits(31) if seed is None else seed
    generator = torch.Generator().manual_seed(seed)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    max_abs_diff = 0.0
    model.eval()
    for batch_size in batch_sizes:
        x = torch.rand((batch_size, *input_shape), generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        (actual,) = session.run(None, {input_name: x.numpy()})
        max_abs_diff = max(max_abs_diff, float(np.max(np.abs(actual - expected))))

    report = ParityReport(max_abs_diff, tolerance, tuple(batch_sizes), seed)
    logger.info(
        "ONNX Runtime vs PyTorch: max abs diff %.3g (tolerance %.0e, seed %d)",
        max_abs_diff,
        tolerance,
        seed,
    )
    if not report.passed:
        raise ParityError(
            f"ONNX export {onnx_path} differs from PyTorch by {max_abs_diff:.3g}, above "
            f"the tolerance {tolerance:.0e} (random inputs, seed {seed}); the version "
            "was not published. Check the model for export-unsafe operations.",
            max_abs_diff=max_abs_diff,
            tolerance=tolerance,
        )
    return report
