"""Export multi-input, multi-output models to ONNX and gate them on parity."""

from __future__ import annotations

import logging
import secrets
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from clinfer.export.onnx_export import DEFAULT_TOLERANCE, OPSET

from clinfer.errors import ExportError, ParityError

logger = logging.getLogger(__name__)

RANDOM_GATE = "random"
REAL_GATE = "real"


@dataclass(frozen=True)
class GateResult:
    """One parity gate: largest absolute difference per output over the inputs.

    ``max_abs_diff`` and ``tolerance`` are those of the output that came closest
    to (or furthest past) its tolerance.
    """

    model: str
    gate: str
    max_abs_diff: float
    per_output: dict[str, float]
    tolerance: float
    tolerances: dict[str, float]
    samples: int
    seed: int | None

    @property
    def passed(self) -> bool:
        return all(
            diff <= self.tolerances[name] for name, diff in self.per_output.items()
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def export_multi_onnx(
    model: torch.nn.Module,
    path: Path,
    *,
    examples: Mapping[str, np.ndarray],
    output_names: Sequence[str],
) -> None:
    """Write ``model`` to ``path`` as ONNX with a dynamic batch axis on every tensor.

    ``examples`` maps input names, in the order of ``model.forward``'s arguments, to
    example arrays with a batch axis.

    Raises
    ------
    ExportError
        If torch.onnx fails or the written file does not pass ``onnx.checker``.
    """
    model.eval()
    inputs = tuple(torch.from_numpy(np.asarray(v)) for v in examples.values())
    names = list(examples)
    dynamic = {name: {0: "batch"} for name in [*names, *output_names]}
    try:
        with warnings.catch_warnings():
            # torch 2.9+ deprecates the TorchScript-based exporter in favour of the
            # dynamo one, which needs onnxscript. The TorchScript exporter still
            # exports these models exactly, as the parity gates check.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(
                model,
                inputs,
                str(path),
                input_names=names,
                output_names=list(output_names),
                dynamic_axes=dynamic,
                opset_version=OPSET,
                dynamo=False,
            )
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(
            f"exporting {type(model).__name__} to {path} failed: {exc}"
        ) from exc


def _torch_outputs(
    model: torch.nn.Module, inputs: Mapping[str, np.ndarray]
) -> list[np.ndarray]:
    with torch.no_grad():
        result = model(*(torch.from_numpy(np.asarray(v)) for v in inputs.values()))
    if isinstance(result, torch.Tensor):
        result = (result,)
    return [tensor.numpy() for tensor in result]


def check_gate(
    name: str,
    model: torch.nn.Module,
    onnx_path: Path,
    batches: Sequence[Mapping[str, np.ndarray]],
    *,
    gate: str,
    tolerance: float = DEFAULT_TOLERANCE,
    output_tolerances: Mapping[str, float] | None = None,
    seed: int | None = None,
) -> GateResult:
    """Compare ONNX Runtime with PyTorch on ``batches`` and raise above tolerance.

    Every output of the ONNX file is compared with the output of ``model`` at the
    same position, against ``output_tolerances[name]`` where given, else
    ``tolerance``.

    Raises
    ------
    ParityError
        If the largest absolute difference of an output over all batches exceeds
        its tolerance. The message names the model, the gate, the output and the
        difference.
    """
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    output_names = [output.name for output in session.get_outputs()]
    per_output = dict.fromkeys(output_names, 0.0)
    samples = 0
    model.eval()
    for batch in batches:
        feeds = {key: np.ascontiguousarray(value) for key, value in batch.items()}
        expected = _torch_outputs(model, feeds)
        actual = session.run(output_names, feeds)
        for output, want, got in zip(output_names, expected, actual):
            if want.shape != got.shape:
                raise ParityError(
                    f"{name}: ONNX output {output!r} has shape {got.shape}, PyTorch "
                    f"{want.shape} ({gate} inputs); the version was not published",
                    max_abs_diff=float("inf"),
                    tolerance=tolerance,
                )
            diff = float(np.max(np.abs(got.astype(np.float64) - want)))
            per_output[output] = max(per_output[output], diff)
        samples += len(next(iter(feeds.values())))
    tolerances = {
        output: (output_tolerances or {}).get(output, tolerance)
        for output in output_names
    }
    worst = max(per_output, key=lambda output: per_output[output] / tolerances[output])
    result = GateResult(
        name,
        gate,
        per_output[worst],
        per_output,
        tolerances[worst],
        tolerances,
        samples,
        seed,
    )
    logger.info(
        "%s %s-input parity over %d samples: %s",
        name,
        gate,
        samples,
        ", ".join(
            f"{output} max abs diff {diff:.3g} (tolerance {tolerances[output]:.0e})"
            for output, diff in per_output.items()
        ),
    )
    if not result.passed:
        seed_text = "" if seed is None else f", seed {seed}"
        raise ParityError(
            f"{name}: the {gate}-input parity gate failed: ONNX Runtime output "
            f"{worst!r} differs from PyTorch by {result.max_abs_diff:.3g}, above the "
            f"tolerance {result.tolerance:.0e} ({samples} samples{seed_text}); the version "
            "was not published. Check the model for export-unsafe operations.",
            max_abs_diff=result.max_abs_diff,
            tolerance=result.tolerance,
        )
    return result


def random_batches(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    seed: int | None = None,
    batch_sizes: Sequence[int] = (1, 3, 8),
    centres: Mapping[str, np.ndarray] | None = None,
    scales: Mapping[str, np.ndarray] | None = None,
) -> tuple[list[dict[str, np.ndarray]], int]:
    """Draw fresh random inputs and return them with the seed used.

    An input without a centre is uniform in [0, 1] (images). An input with a
    centre and scale is normal around it (raw tabular features near their training
    distribution), drawn with 3 times the scale to reach the tails. A new seed is
    drawn unless ``seed`` is given, so repeated exports see other inputs.
    """
    seed = secrets.randbits(31) if seed is None else seed
    rng = np.random.default_rng(seed)
    centres = centres or {}
    scales = scales or {}
    batches = []
    for size in batch_sizes:
        batch = {}
        for name, shape in shapes.items():
            if name in centres:
                noise = rng.standard_normal((size, *shape))
                values = centres[name] + 3.0 * scales[name] * noise
            else:
                values = rng.uniform(0.0, 1.0, (size, *shape))
            batch[name] = values.astype(np.float32)
        batches.append(batch)
    return batches, seed
