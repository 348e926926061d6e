"""GPU serving variant: TensorRT and ONNX Runtime models under perf_analyzer, with NVML.

Run from the repository root on a machine with an NVIDIA GPU, the ``tensorrt``
package, CUDA-enabled torch and Triton's ``tensorrt`` and ``onnxruntime`` backends::

    bench/gpu_variant.sh OUT_DIR

It builds an fp16 TensorRT engine of ``cxr_resnet`` with
``clinfer.export.tensorrt_engine``. One embedded server serves the engine
(``tensorrt_plan``) and the ONNX file (native ``onnxruntime`` backend, KIND_GPU).
perf_analyzer loads both while a thread samples GPU utilisation through NVML, and the
workers' decode stage is timed on synthetic copies of a corpus file. The result is
written to ``OUT_DIR/gpu_variant.json`` (a ``BenchResult``). Without a GPU it prints
what is missing and exits with status 3.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from clinfer.bench.schema import BenchResult, Plot, Ratio, Series, machine_info
from clinfer.bench.serving import (
    PerfAnalyzerRun,
    load_tensors,
    write_input_data,
)
from clinfer.client.triton import TritonModelClient
from clinfer.export import tensorrt_engine
from clinfer.export.cxr import CXR_MODEL_NAME, INPUT_SIZE, cxr_spec, export_cxr_model
from clinfer.export.repository import TritonConfigOptions, render_config

from clinfer.server import EmbeddedTritonServer, prepare_backend_dir

logger = logging.getLogger(__name__)

EXIT_UNAVAILABLE = 3
DEFAULT_BACKENDS = Path("/opt/tritonserver/backends")
TRT_MODEL = "cxr_resnet_trt"
ORT_MODEL = "cxr_resnet_ort"
NVML_INTERVAL_S = 0.1


@dataclass(frozen=True)
class GpuConfig:
    """Settings of the GPU variant; ``small()`` is for a quick check on the device."""

    batch_size: int = 32
    concurrency: int = 4
    repeats: int = 3
    perf_request_count: int = 50
    decode_instances: int = 400
    decode_workers: int = 0
    """Processes of the decode measurement; 0 for the CPU count."""
    backends: Path = DEFAULT_BACKENDS
    """Folder with Triton's ``tensorrt`` and ``onnxruntime`` backends."""

    @classmethod
    def small(cls) -> GpuConfig:
        """Return a configuration that runs in about a minute on a GPU machine."""
        return cls(repeats=2, perf_request_count=20, decode_instances=100)


def missing_requirements(backends: Path) -> list[str]:
    """List what this machine lacks for the GPU variant, in plain words."""
    missing = []
    if shutil.which("nvidia-smi") is None:
        missing.append("nvidia-smi is not on PATH (no NVIDIA driver)")
    try:
        import pynvml

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() < 1:
            missing.append("NVML reports no GPU")
        pynvml.nvmlShutdown()
    except ImportError:
        missing.append("nvidia-ml-py (pynvml) is not installed")
    except pynvml.NVMLError as exc:
        missing.append(f"NVML cannot start: {exc}")
    reason = tensorrt_engine.tensorrt_unavailable_reason()
    if reason:
        missing.append(f"TensorRT: {reason}")
    for backend in ("tensorrt", "onnxruntime"):
        if not (backends / backend).is_dir():
            missing.append(
                f"Triton's {backend} backend is not in {backends} (set "
                "TRITON_BACKENDS to the backends folder of a Triton 24.10 install)"
            )
    return missing


class UtilisationSampler:
    """A thread that samples GPU 0's utilisation through NVML until stopped."""

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self._stop = threading.Event()
        self.samples: list[int] = []
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(NVML_INTERVAL_S):
            rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            self.samples.append(int(rates.gpu))

    def __enter__(self) -> UtilisationSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._nvml.nvmlShutdown()

    def summary(self) -> dict[str, float | None]:
        if not self.samples:
            return {"mean_percent": None, "max_percent": None}
        return {
            "mean_percent": float(statistics.fmean(self.samples)),
            "max_percent": float(max(self.samples)),
        }


def tensorrt_config(spec: dict[str, Any], options: TritonConfigOptions) -> str:
    """Render config.pbtxt of the engine model (``tensorrt_plan``, KIND_GPU)."""
    dims = [spec["input"]["channels"], spec["input"]["height"], spec["input"]["width"]]
    return (
        "\n".join(
            [
                f'name: "{TRT_MODEL}"',
                'platform: "tensorrt_plan"',
                f"max_batch_size: {options.max_batch_size}",
                f'input [ {{ name: "{spec["input"]["name"]}" data_type: TYPE_FP32 '
                f"dims: {dims} }} ]",
                f'output [ {{ name: "{spec["output"]["name"]}" data_type: TYPE_FP32 '
                f"dims: [{len(spec['labels'])}] }} ]",
                "instance_group [ { kind: KIND_GPU count: 1 } ]",
                "dynamic_batching {",
                f"  preferred_batch_size: {list(options.preferred_batch_sizes)}",
                f"  max_queue_delay_microseconds: {options.max_queue_delay_us}",
                "}",
            ]
        )
        + "\n"
    )


def write_gpu_repository(work_dir: Path, options: TritonConfigOptions) -> Path:
    """Export the ONNX file, build the engine and lay out both GPU models.

    Raises
    ------
    clinfer.errors.ExportError
        If the export or the engine build fails.
    """
    source = work_dir / "source_repository"
    exported = export_cxr_model(source, options=options)
    onnx_path = source / CXR_MODEL_NAME / str(exported.version) / "model.onnx"
    repo = work_dir / "gpu_repository"
    spec = cxr_spec(seed=0)
    ort_dir = repo / ORT_MODEL / "1"
    ort_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(onnx_path, ort_dir / "model.onnx")
    text = render_config(spec, backend="onnxruntime", options=options)
    text = text.replace(f'name: "{CXR_MODEL_NAME}"', f'name: "{ORT_MODEL}"', 1)
    (repo / ORT_MODEL / "config.pbtxt").write_text(text)
    trt_dir = repo / TRT_MODEL / "1"
    trt_dir.mkdir(parents=True, exist_ok=True)
    tensorrt_engine.build_engine(
        onnx_path,
        trt_dir / "model.plan",
        {spec["input"]["name"]: (1, INPUT_SIZE, INPUT_SIZE)},
        max_batch_size=options.max_batch_size,
    )
    (repo / TRT_MODEL / "config.pbtxt").write_text(tensorrt_config(spec, options))
    return repo


def _decode_one(path: str) -> int:
    from clinfer.workers.stages import DecodeStage

    stage = DecodeStage(height=INPUT_SIZE, width=INPUT_SIZE, strict=False)
    out = stage({"path": np.array([path]), "sop_instance_uid": np.array(["x"])})
    return int(out["tensor"].shape[0])


def measure_decode(paths: list[Path], workers: int) -> float:
    """Return decode-and-preprocess instances/s of the workers' stage over ``paths``."""
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_decode_one, [str(p) for p in paths[:workers]]))
        started = time.perf_counter()
        list(pool.map(_decode_one, [str(p) for p in paths], chunksize=8))
        wall = time.perf_counter() - started
    return len(paths) / wall


def run(config: GpuConfig, work_dir: Path) -> BenchResult:
    """Build, serve and measure the GPU models; return the result.

    Raises
    ------
    clinfer.errors.ClinferError
        If the engine build, the server or perf_analyzer fails.
    """
    from clinfer.bench.synthetic import write_copies

    work_dir.mkdir(parents=True, exist_ok=True)
    options = replace(
        TritonConfigOptions(),
        max_batch_size=max(32, config.batch_size),
        realtime_model=False,
    )
    repo = write_gpu_repository(work_dir, options)
    tensors = load_tensors(config.batch_size)
    backend_dir = work_dir / "backends"
    backend_dir.mkdir(exist_ok=True)
    for backend in ("tensorrt", "onnxruntime"):
        link = backend_dir / backend
        if not link.exists():
            link.symlink_to(config.backends / backend, target_is_directory=True)
    prepare_backend_dir(backend_dir)
    # NOTE: assumes the nvidia-pytriton tritonserver 2.51 loads the tensorrt and
    # onnxruntime backends of a matching Triton 24.10 install; not yet run here.
    runs: dict[str, list[dict[str, Any]]] = {TRT_MODEL: [], ORT_MODEL: []}
    utilisation: dict[str, list[dict[str, float | None]]] = {
        TRT_MODEL: [],
        ORT_MODEL: [],
    }
    with EmbeddedTritonServer(
        repo,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        log_file=work_dir / "tritonserver.log",
        backend_dir=backend_dir,
    ) as server:
        for model in runs:
            client = TritonModelClient(server.grpc_url, model)
            try:
                client.wait_ready(timeout_s=300.0)
            finally:
                client.close()
        input_data = write_input_data(work_dir / "perf_input.json", tensors, "image")
        for _ in range(config.repeats):
            for model in runs:
                perf = PerfAnalyzerRun(
                    server.grpc_url,
                    model,
                    input_data,
                    work_dir,
                    config.perf_request_count,
                    shared_memory="system",
                )
                with UtilisationSampler() as sampler:
                    measured = perf.measure(config.batch_size, config.concurrency)
                runs[model].append(asdict(measured))
                utilisation[model].append(sampler.summary())
    workers = config.decode_workers or os.cpu_count() or 1
    copies = write_copies(work_dir / "decode_copies", config.decode_instances)
    decode_rate = measure_decode(copies, workers)
    return _result(config, runs, utilisation, decode_rate, workers)


def _result(
    config: GpuConfig,
    runs: dict[str, list[dict[str, Any]]],
    utilisation: dict[str, list[dict[str, float | None]]],
    decode_rate: float,
    workers: int,
) -> BenchResult:
    medians = {
        model: float(statistics.median(r["images_per_s"] for r in measured))
        for model, measured in runs.items()
    }
    setting = f"batch {config.batch_size}, concurrency {config.concurrency}"
    ratios = [
        Ratio(
            "gpu_trt_vs_ort",
            medians[TRT_MODEL] / medians[ORT_MODEL],
            medians[TRT_MODEL],
            medians[ORT_MODEL],
            "images/s",
            f"TensorRT fp16 ÷ onnxruntime backend under perf_analyzer ({setting})",
        ),
        Ratio(
            "gpu_feed_vs_serve",
            decode_rate / medians[TRT_MODEL],
            decode_rate,
            medians[TRT_MODEL],
            "instances/s",
            f"decode stage with {workers} processes (single-frame MR copies) ÷ "
            "served TensorRT model; below 1 means decoding cannot feed the GPU",
        ),
    ]
    names = list(medians)
    plots = [
        Plot(
            name="gpu_models",
            title=f"GPU models under perf_analyzer ({setting})",
            x_label="model",
            y_label="images/s",
            series=[
                Series(
                    "median images/s",
                    [float(i) for i in range(len(names))],
                    [medians[n] for n in names],
                )
            ],
            categories=names,
        )
    ]
    return BenchResult(
        name="gpu_variant",
        title="GPU serving: TensorRT vs ONNX Runtime, decode feed vs serve capacity",
        command="bench/gpu_variant.sh OUT_DIR",
        ratios=ratios,
        plots=plots,
        raw={
            "config": {**asdict(config), "backends": str(config.backends)},
            "machine": machine_info(),
            "perf_analyzer_runs": runs,
            "gpu_utilisation": utilisation,
            "decode_instances_per_s": decode_rate,
            "decode_workers": workers,
        },
    )


def main(argv: list[str] | None = None) -> int:
    """Check the machine, run the GPU variant and write its JSON; return the status."""
    parser = argparse.ArgumentParser(prog="python -m clinfer.bench.gpu")
    parser.add_argument("out", type=Path, help="folder for gpu_variant.json")
    parser.add_argument("--small", action="store_true", help="quick check settings")
    parser.add_argument(
        "--backends",
        type=Path,
        default=Path(os.environ.get("TRITON_BACKENDS", DEFAULT_BACKENDS)),
        help="folder with Triton's tensorrt and onnxruntime backends",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    missing = missing_requirements(args.backends)
    if missing:
        print(
            "GPU variant not run; this machine lacks:\n  - "
            + "\n  - ".join(missing)
            + "\nRun bench/gpu_variant.sh on a machine with an NVIDIA GPU and driver, "
            "the tensorrt package, CUDA-enabled torch and Triton's GPU backends.",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE

    config = GpuConfig.small() if args.small else GpuConfig()
    config = replace(config, backends=args.backends)
    args.out.mkdir(parents=True, exist_ok=True)
    # The engine, copies and repository stay out of OUT, which should hold few files.
    with tempfile.TemporaryDirectory(prefix="clinfer-gpu-") as tmp:
        try:
            result = run(config, Path(tmp))
        finally:
            log = Path(tmp) / "tritonserver.log"
            if log.is_file():
                shutil.copy2(log, args.out / "tritonserver.log")
    target = args.out / "gpu_variant.json"
    target.write_text(json.dumps(result.to_json(), indent=2))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
