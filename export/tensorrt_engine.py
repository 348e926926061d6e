"""Build TensorRT fp16 engines from ONNX files and compare them with ONNX Runtime.

Runs only where the ``tensorrt`` Python package and a CUDA GPU are present, and
torch (with CUDA) allocates the device buffers. Elsewhere
``tensorrt_unavailable_reason`` returns why, and callers record the step as skipped.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from clinfer.errors import ExportError

logger = logging.getLogger(__name__)

# Maximum allowed drop of held-out AUROC from ONNX Runtime fp32 to TensorRT fp16.
AUROC_TOLERANCE = 0.005
SKIPPED = "skipped"
PASSED = "passed"
FAILED = "failed"


@dataclass(frozen=True)
class TensorRtResult:
    """Outcome of the TensorRT step for one model."""

    model: str
    status: str
    reason: str = ""
    max_abs_diff: float | None = None
    auroc_onnx: float | None = None
    auroc_tensorrt: float | None = None
    engine: str | None = None

    @property
    def auroc_delta(self) -> float | None:
        if self.auroc_onnx is None or self.auroc_tensorrt is None:
            return None
        return self.auroc_onnx - self.auroc_tensorrt

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "auroc_delta": self.auroc_delta}


def tensorrt_unavailable_reason() -> str | None:
    """Return why TensorRT engines cannot be built here, or None if they can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt Python package is not installed"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch (torch.cuda.is_available() is False)"
    return None


def skipped(model: str, reason: str) -> TensorRtResult:
    """Return the result recorded when the TensorRT step cannot run."""
    logger.info("TensorRT step for %s skipped: %s", model, reason)
    return TensorRtResult(model, SKIPPED, reason=reason)


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    input_shapes: Mapping[str, tuple[int, ...]],
    *,
    max_batch_size: int,
    fp16: bool = True,
) -> Path:
    """Build a serialized TensorRT engine with one batch optimisation profile.

    The profile spans batch sizes 1 to ``max_batch_size`` (optimum at half).

    Raises
    ------
    ExportError
        If TensorRT is unavailable or fails to parse or build.
    """
    reason = tensorrt_unavailable_reason()
    if reason:
        raise ExportError(f"cannot build a TensorRT engine: {reason}")
    # NOTE: written against the TensorRT 10 Python API and not yet run here (no GPU).
    trt = importlib.import_module("tensorrt")
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    optimum = max(1, max_batch_size // 2)
    for name, shape in input_shapes.items():
        profile.set_shape(
            name, (1, *shape), (optimum, *shape), (max_batch_size, *shape)
        )
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path}")
    engine_path = Path(engine_path)
    engine_path.write_bytes(bytes(serialized))
    return engine_path


def run_engine(
    engine_path: Path, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]
) -> list[np.ndarray]:
    """Run a serialized engine once on the GPU and return the named outputs.

    Raises
    ------
    ExportError
        If TensorRT is unavailable or the engine cannot be deserialized or run.
    """
    reason = tensorrt_unavailable_reason()
    if reason:
        raise ExportError(f"cannot run a TensorRT engine: {reason}")
    import torch

    trt = importlib.import_module("tensorrt")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise ExportError(f"TensorRT could not deserialize {engine_path}")
    context = engine.create_execution_context()
    buffers = {}
    for name, array in feeds.items():
        tensor = torch.from_numpy(np.ascontiguousarray(array)).cuda()
        buffers[name] = tensor
        context.set_input_shape(name, tuple(tensor.shape))
    for name in output_names:
        shape = tuple(context.get_tensor_shape(name))
        buffers[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
    for name, tensor in buffers.items():
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise ExportError(f"TensorRT failed to run {engine_path}")
    stream.synchronize()
    return [buffers[name].cpu().numpy() for name in output_names]


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(set(labels.tolist())) < 2:
        return None
    return float(roc_auc_score(labels, scores))


def check_engine(
    model: str,
    onnx_path: Path,
    engine_path: Path,
    batches: Sequence[Mapping[str, np.ndarray]],
    labels: np.ndarray,
    *,
    probability_output: str = "probabilities",
    auroc_tolerance: float = AUROC_TOLERANCE,
) -> TensorRtResult:
    """Compare an engine with ONNX Runtime on held-out batches.

    Returns the max abs diff over all outputs and the AUROC of the positive-class
    probability under each runtime. The status is failed when the AUROC drops by
    more than ``auroc_tolerance``.

    Raises
    ------
    ExportError
        If TensorRT is unavailable or the engine cannot be run.
    """
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    position = names.index(probability_output)
    max_abs_diff = 0.0
    onnx_scores, trt_scores = [], []
    for batch in batches:
        expected = session.run(names, dict(batch))
        actual = run_engine(engine_path, batch, names)
        for want, got in zip(expected, actual):
            max_abs_diff = max(max_abs_diff, float(np.max(np.abs(want - got))))
        onnx_scores.append(expected[position][:, 1])
        trt_scores.append(actual[position][:, 1])
    auroc_onnx = _auroc(labels, np.concatenate(onnx_scores))
    auroc_trt = _auroc(labels, np.concatenate(trt_scores))
    status = PASSED
    reason = ""
    if auroc_onnx is not None and auroc_trt is not None:
        if auroc_onnx - auroc_trt > auroc_tolerance:
            status = FAILED
            reason = (
                f"AUROC drops by {auroc_onnx - auroc_trt:.4f}, above {auroc_tolerance}"
            )
    return TensorRtResult(
        model,
        status,
        reason=reason,
        max_abs_diff=max_abs_diff,
        auroc_onnx=auroc_onnx,
        auroc_tensorrt=auroc_trt,
        engine=str(engine_path),
    )
