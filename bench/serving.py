"""Serving throughput of clinfer's gRPC client path against ONNX Runtime and perf_analyzer.

P2 times the same preprocessed tensors (frames of real corpus files, preprocessed by
the workers' code and tiled to the batch size) three ways, interleaved after a
warm-up, and compares medians in images/s:

- ``client``: ``clinfer.client.triton.TritonModelClient.infer`` from ``concurrency``
  threads, one client each, to an embedded Triton server (the workers' path);
- ``client_shm``: the same requests with input and output in system shared memory;
- ``ort``: one in-process ONNX Runtime session on the same ONNX file with the
  server's ONNX Runtime settings (intra-op threads, inter-op 1, spinning);
- ``perf_analyzer``: Triton's own load generator on the same model, batch size,
  concurrency and tensors (``--input-data`` JSON), in ``count_windows`` mode.

The sweep then times the client path over batch sizes and over concurrency, and
picks the smallest batch size and concurrency within ``within_peak`` of the peak.
"""

from __future__ import annotations

import base64
import csv
import importlib.util
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as triton_grpc
from clinfer.bench.schema import BenchResult, Plot, Ratio, Series, machine_info
from clinfer.client.triton import ModelSpec, TritonModelClient
from clinfer.export.cxr import CXR_MODEL_NAME, export_cxr_model
from clinfer.export.repository import BATCH_PRIORITY, TritonConfigOptions
from clinfer.workers.preprocess import PreprocessConfig, load_and_preprocess
from tritonclient.utils import InferenceServerException

from clinfer.errors import ConfigurationError, InferenceError
from clinfer.server import EmbeddedTritonServer

logger = logging.getLogger(__name__)

TARGET_RATIO = 0.95
# Corpus files whose frames make up the benchmark tensors: CT, MR and a 10-frame MR.
SOURCE_FILES = ("CT_small.dcm", "MR_small.dcm", "emri_small.dcm")
PERF_ANALYZER_TIMEOUT_S = 300.0
UNSTABLE_RETRIES = 2


@dataclass(frozen=True)
class ServingConfig:
    """Settings of the serving benchmark; the defaults take a few minutes on 2 cores."""

    batch_size: int = 32
    """Frames per request in P2, for every path."""
    concurrency: int = 2
    """Client threads (and perf_analyzer concurrency) in P2 and the batch sweep."""
    repeats: int = 5
    """Interleaved repeats of the P2 paths after the warm-up."""
    requests_per_thread: int = 12
    """Requests each client thread sends per P2 measurement."""
    perf_request_count: int = 12
    """perf_analyzer ``--measurement-request-count`` (requests per window)."""
    intra_op_threads: int = 0
    """ONNX Runtime intra-op threads of the server and of ``ort``; 0 for the CPU count."""
    shared_memory: bool = True
    """Whether to time the system shared memory variant of the client path."""
    sweep_batch_sizes: tuple[int, ...] = (1, 4, 8, 16, 32, 64)
    sweep_concurrency: tuple[int, ...] = (1, 2, 4, 8)
    sweep_requests: int = 24
    """Requests per sweep point, over all client threads."""
    within_peak: float = 0.05
    """The sweep picks the smallest value whose images/s is within this of the peak."""

    @classmethod
    def small(cls) -> ServingConfig:
        """Return a configuration that runs in well under a minute on 2 cores."""
        return cls(
            batch_size=8,
            concurrency=2,
            repeats=3,
            requests_per_thread=3,
            perf_request_count=4,
            sweep_batch_sizes=(1, 4, 8),
            sweep_concurrency=(1, 2, 4),
            sweep_requests=6,
        )

    @property
    def threads(self) -> int:
        """The resolved ONNX Runtime intra-op thread count."""
        return self.intra_op_threads or os.cpu_count() or 1


@dataclass(frozen=True)
class Measurement:
    """One timed run of a path: images/s and request latency percentiles in ms."""

    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    requests: int


def _measurement(
    images: int, wall_s: float, latencies_s: Sequence[float]
) -> Measurement:
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    p50, p95, p99 = (float(np.percentile(ms, q)) for q in (50, 95, 99))
    return Measurement(images / wall_s, p50, p95, p99, len(latencies_s))


def load_tensors(count: int) -> np.ndarray:
    """Preprocess the frames of the corpus files in ``SOURCE_FILES`` and tile them.

    Returns a float32 array of shape (count, 1, 224, 224).

    Raises
    ------
    clinfer.errors.DicomInputError
        If a corpus file cannot be decoded.
    """
    from clinfer.corpus import find_test_file

    config = PreprocessConfig()
    frames = [
        load_and_preprocess(find_test_file(name), config).frames
        for name in SOURCE_FILES
    ]
    stack = np.concatenate(frames, axis=0)
    reps = -(-count // stack.shape[0])
    return np.ascontiguousarray(np.tile(stack, (reps, 1, 1, 1))[:count])


def server_options(config: ServingConfig) -> TritonConfigOptions:
    """Return the export defaults with the thread count and batch size of the run.

    ``max_batch_size`` is raised to the largest batch size measured, and preferred
    batch sizes above it are dropped. The real-time model is left out, because only
    batch-priority requests are timed.
    """
    defaults = TritonConfigOptions()
    largest = max(defaults.max_batch_size, config.batch_size, *config.sweep_batch_sizes)
    preferred = tuple(b for b in defaults.preferred_batch_sizes if b <= largest)
    return replace(
        defaults,
        max_batch_size=largest,
        preferred_batch_sizes=preferred,
        intra_op_threads=config.threads,
        realtime_model=False,
    )


def ort_session(onnx_path: Path, options: TritonConfigOptions) -> ort.InferenceSession:
    """Open an ONNX Runtime session with the settings of the server's model host."""
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = options.intra_op_threads
    session_options.inter_op_num_threads = 1
    session_options.add_session_config_entry(
        "session.intra_op.allow_spinning", str(int(options.allow_spinning))
    )
    return ort.InferenceSession(
        str(onnx_path), sess_options=session_options, providers=["CPUExecutionProvider"]
    )


def measure_ort(
    session: ort.InferenceSession, images: np.ndarray, batches: int
) -> Measurement:
    """Run ``batches`` batches back to back in-process and time them."""
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    latencies = []
    started = time.perf_counter()
    for _ in range(batches):
        begin = time.perf_counter()
        session.run([output_name], {input_name: images})
        latencies.append(time.perf_counter() - begin)
    wall = time.perf_counter() - started
    return _measurement(batches * images.shape[0], wall, latencies)


def _run_threads(
    senders: Sequence[Callable[[], None]], requests_per_thread: int
) -> tuple[float, list[float]]:
    """Run each sender ``requests_per_thread`` times in its own thread; time them all."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(senders) + 1)

    def work(send: Callable[[], None]) -> None:
        barrier.wait()
        own = []
        try:
            for _ in range(requests_per_thread):
                begin = time.perf_counter()
                send()
                own.append(time.perf_counter() - begin)
        except (InferenceError, InferenceServerException) as exc:
            errors.append(exc)
        with lock:
            latencies.extend(own)

    threads = [threading.Thread(target=work, args=(s,), daemon=True) for s in senders]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise InferenceError(f"{len(errors)} client thread(s) failed: {errors[0]}")
    return wall, latencies


class ClientPool:
    """``TritonModelClient`` instances, one per thread, as the workers' actors use."""

    def __init__(self, url: str, spec: ModelSpec, count: int):
        self.spec = spec
        self.clients = [TritonModelClient(url, spec.name) for _ in range(count)]

    def measure(
        self, images: np.ndarray, concurrency: int, requests_per_thread: int
    ) -> Measurement:
        """Send ``images`` from ``concurrency`` threads and time the requests."""

        def sender(client: TritonModelClient) -> Callable[[], None]:
            return lambda: client.infer(images, self.spec, priority=BATCH_PRIORITY)

        senders = [sender(c) for c in self.clients[:concurrency]]
        wall, latencies = _run_threads(senders, requests_per_thread)
        return _measurement(images.shape[0] * len(latencies), wall, latencies)

    def close(self) -> None:
        for client in self.clients:
            client.close()


class SharedMemoryClient:
    """One gRPC client whose input and output tensors live in system shared memory.

    Each request copies the batch into the input region, as a worker would copy a
    fresh batch, and reads the output back from the output region. The regions are
    POSIX shared memory from ``multiprocessing.shared_memory``, because
    ``tritonclient.utils.shared_memory`` 2.51 imports ``pkg_resources``, which
    setuptools 81 and later no longer ship.
    """

    def __init__(self, url: str, spec: ModelSpec, batch_size: int, tag: str):
        self.spec = spec
        self.client = triton_grpc.InferenceServerClient(url)
        input_bytes = batch_size * spec.channels * spec.height * spec.width * 4
        output_bytes = batch_size * len(spec.labels) * 4
        self.names = (f"clinfer_in_{tag}", f"clinfer_out_{tag}")
        self.regions: list[SharedMemory] = []
        self.registered: list[str] = []
        try:
            for name, size in zip(self.names, (input_bytes, output_bytes)):
                region = SharedMemory(name=name, create=True, size=size)
                self.regions.append(region)
                self.client.register_system_shared_memory(name, f"/{name}", size)
                self.registered.append(name)
        except (InferenceServerException, OSError) as exc:
            self.close()
            raise InferenceError(
                f"cannot set up system shared memory region {name!r} for Triton at "
                f"{url}: {exc}; check that /dev/shm is writable and shared with the "
                "server."
            ) from exc

    def send(self, images: np.ndarray) -> np.ndarray:
        """Run one batch through shared memory and return a copy of the output.

        Raises
        ------
        InferenceError
            If Triton rejects or fails the request.
        """
        spec = self.spec
        staged = np.ndarray(images.shape, np.float32, buffer=self.regions[0].buf)
        staged[...] = images
        tensor = triton_grpc.InferInput(spec.input_name, list(images.shape), "FP32")
        tensor.set_shared_memory(self.names[0], images.nbytes)
        output = triton_grpc.InferRequestedOutput(spec.output_name)
        shape = (images.shape[0], len(spec.labels))
        output.set_shared_memory(self.names[1], shape[0] * shape[1] * 4)
        try:
            self.client.infer(
                spec.name,
                [tensor],
                model_version=spec.version,
                outputs=[output],
                priority=BATCH_PRIORITY,
            )
        except InferenceServerException as exc:
            raise InferenceError(
                f"Triton failed a shared-memory batch of {images.shape[0]} for "
                f"{spec.name}:{spec.version}: {exc.message()}"
            ) from exc
        result = np.ndarray(shape, np.float32, buffer=self.regions[1].buf).copy()
        del staged
        return result

    def close(self) -> None:
        for name in self.registered:
            try:
                self.client.unregister_system_shared_memory(name)
            except InferenceServerException as exc:
                logger.warning("cannot unregister shared memory %s: %s", name, exc)
        self.registered = []
        for region in self.regions:
            region.close()
            region.unlink()
        self.regions = []
        self.client.close()


def measure_shared_memory(
    clients: Sequence[SharedMemoryClient], images: np.ndarray, requests_per_thread: int
) -> Measurement:
    """Send ``images`` through shared memory, one thread per client."""

    def sender(client: SharedMemoryClient) -> Callable[[], None]:
        return lambda: client.send(images)

    wall, latencies = _run_threads([sender(c) for c in clients], requests_per_thread)
    return _measurement(images.shape[0] * len(latencies), wall, latencies)


def perf_analyzer_binary() -> Path:
    """Return the ``perf_analyzer`` of this environment (tritonclient 2.51.0 wheel).

    Raises
    ------
    ConfigurationError
        If the binary is missing.
    """
    binary = Path(sys.executable).parent / "perf_analyzer"
    if not binary.is_file():
        found = shutil.which("perf_analyzer")
        if found is None:
            raise ConfigurationError(
                f"perf_analyzer is not in {binary.parent} or on PATH; install "
                "tritonclient[grpc,http]==2.51.0, whose wheel ships it."
            )
        binary = Path(found)
    return binary


def perf_analyzer_env() -> dict[str, str]:
    """Return the environment with the CUDA runtime wheel's folder on LD_LIBRARY_PATH.

    perf_analyzer 2.51 links ``libcudart.so.12`` even for CPU-only servers; the
    ``nvidia-cuda-runtime-cu12`` wheel provides it. It also needs Debian's
    ``libb64-0d``.

    Raises
    ------
    ConfigurationError
        If the ``nvidia-cuda-runtime-cu12`` wheel is not installed.
    """
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    locations = list(spec.submodule_search_locations or []) if spec else []
    libs = [Path(p) / "lib" for p in locations if (Path(p) / "lib").is_dir()]
    if not libs:
        raise ConfigurationError(
            "perf_analyzer needs libcudart.so.12, which the nvidia-cuda-runtime-cu12 "
            "wheel provides; install it with `pip install "
            "nvidia-cuda-runtime-cu12==12.6.77`."
        )
    env = dict(os.environ)
    paths = [str(libs[0]), *filter(None, [env.get("LD_LIBRARY_PATH")])]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
    return env


def write_input_data(path: Path, images: np.ndarray, input_name: str) -> Path:
    """Write ``images`` as a perf_analyzer ``--input-data`` JSON file, one step each."""
    steps = [
        {
            input_name: {
                "b64": base64.b64encode(image.tobytes()).decode("ascii"),
                "shape": list(image.shape),
            }
        }
        for image in images
    ]
    path.write_text(json.dumps({"data": steps}))
    return path


class _UnstableError(Exception):
    """perf_analyzer found no stable measurement windows."""


@dataclass(frozen=True)
class PerfAnalyzerRun:
    """How to call perf_analyzer against one server and model."""

    url: str
    model: str
    input_data: Path
    work_dir: Path
    request_count: int
    shared_memory: str = "none"

    def measure(self, batch_size: int, concurrency: int) -> Measurement:
        """Run perf_analyzer once and return its images/s and latency percentiles.

        Raises
        ------
        ConfigurationError
            If perf_analyzer or its libraries are missing.
        InferenceError
            If perf_analyzer fails or writes no CSV report.
        """
        # perf_analyzer exits with status 2 when no measurement windows agree; on
        # loaded cores it is retried with windows of twice as many requests.
        request_count = self.request_count
        for attempt in range(UNSTABLE_RETRIES + 1):
            try:
                return self._measure_once(batch_size, concurrency, request_count)
            except _UnstableError as exc:
                if attempt == UNSTABLE_RETRIES:
                    raise InferenceError(
                        f"perf_analyzer found no stable measurement for batch "
                        f"{batch_size}, concurrency {concurrency} in "
                        f"{UNSTABLE_RETRIES + 1} attempts (last with "
                        f"{request_count} requests per window): {exc}; rerun on "
                        "idle cores or raise the request count."
                    ) from exc
                logger.info("perf_analyzer unstable (%s); retrying", exc)
                request_count *= 2
        raise AssertionError("unreachable")

    def _measure_once(
        self, batch_size: int, concurrency: int, request_count: int
    ) -> Measurement:
        report = self.work_dir / f"perf_b{batch_size}_c{concurrency}.csv"
        report.unlink(missing_ok=True)
        command = [
            str(perf_analyzer_binary()),
            *("-m", self.model, "-u", self.url, "-i", "grpc"),
            *("-b", str(batch_size)),
            *("--concurrency-range", f"{concurrency}:{concurrency}"),
            *("--input-data", str(self.input_data)),
            *("--measurement-mode", "count_windows"),
            *("--measurement-request-count", str(request_count)),
            # A shared 2-core machine rarely keeps three windows within the default
            # 10 %, so the stability check is relaxed. It compares average latency,
            # because the p99 of a short window varies too much; the CSV still
            # reports p50, p95 and p99.
            *("--stability-percentage", "1000", "--max-trials", "10"),
            *("--shared-memory", self.shared_memory),
            *("-f", str(report)),
        ]
        try:
            completed = subprocess.run(
                command,
                env=perf_analyzer_env(),
                capture_output=True,
                text=True,
                timeout=PERF_ANALYZER_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise InferenceError(
                f"perf_analyzer did not finish within {PERF_ANALYZER_TIMEOUT_S:.0f} s "
                f"for batch {batch_size}, concurrency {concurrency}."
            ) from exc
        if (
            completed.returncode == 2
            and "stable" in completed.stdout + completed.stderr
        ):
            raise _UnstableError((completed.stderr or completed.stdout)[-300:].strip())
        if completed.returncode != 0 or not report.is_file():
            tail = (completed.stderr or completed.stdout)[-800:]
            raise InferenceError(
                f"perf_analyzer exited with status {completed.returncode} for batch "
                f"{batch_size}, concurrency {concurrency}: {tail.strip()}; if it "
                "reports a missing library, install Debian's libb64-0d."
            )
        with open(report, newline="") as handle:
            row = next(csv.DictReader(handle))
        # CSV latencies are in microseconds; Inferences/Second counts batch elements.
        return Measurement(
            images_per_s=float(row["Inferences/Second"]),
            p50_ms=float(row["p50 latency"]) / 1000.0,
            p95_ms=float(row["p95 latency"]) / 1000.0,
            p99_ms=float(row["p99 latency"]) / 1000.0,
            requests=0,
        )


def workers_default_batch_size() -> int | None:
    """Return the workers' default batch size (``JobOptions.batch_size``)."""
    try:
        from clinfer.workers.pipeline import JobOptions
    except ImportError as exc:
        logger.warning("cannot read the workers' default batch size: %s", exc)
        return None
    defaults = {f.name: f.default for f in fields(JobOptions)}
    return int(defaults["batch_size"])


def smallest_within_peak(
    points: dict[int, Measurement], within: float
) -> tuple[int, float]:
    """Return the smallest key whose images/s is within ``within`` of the peak."""
    peak = max(m.images_per_s for m in points.values())
    for key in sorted(points):
        if points[key].images_per_s >= (1.0 - within) * peak:
            return key, peak
    raise ValueError("no sweep points")  # unreachable: the peak itself qualifies


def _median(runs: Sequence[Measurement]) -> float:
    return float(statistics.median(m.images_per_s for m in runs))


def _ratio(
    name: str,
    numerator: float,
    denominator: float,
    description: str,
    target: float | None,
) -> Ratio:
    return Ratio(
        name=name,
        value=numerator / denominator,
        numerator=numerator,
        denominator=denominator,
        unit="images/s",
        description=description,
        target=target,
    )


@dataclass
class _Context:
    """Server clients, tensors and ONNX Runtime session shared by the measurements."""

    config: ServingConfig
    spec: ModelSpec
    pool: ClientPool
    session: ort.InferenceSession
    tensors: np.ndarray
    perf: PerfAnalyzerRun


def _run_p2(ctx: _Context, shm_clients: Sequence[SharedMemoryClient]) -> dict[str, Any]:
    """Time the P2 paths after a warm-up, interleaved, ``repeats`` times each."""
    config = ctx.config
    images = ctx.tensors[: config.batch_size]
    paths: dict[str, Callable[[int], Measurement]] = {
        "client": lambda n: ctx.pool.measure(images, config.concurrency, n),
        "ort": lambda n: measure_ort(ctx.session, images, n * config.concurrency),
    }
    if shm_clients:
        paths["client_shm"] = lambda n: measure_shared_memory(shm_clients, images, n)
    for measure in paths.values():
        measure(1)
    runs: dict[str, list[Measurement]] = {
        name: [] for name in [*paths, "perf_analyzer"]
    }
    for repeat in range(config.repeats):
        for name, measure in paths.items():
            runs[name].append(measure(config.requests_per_thread))
        runs["perf_analyzer"].append(
            ctx.perf.measure(config.batch_size, config.concurrency)
        )
        logger.info(
            "P2 repeat %d/%d: %s",
            repeat + 1,
            config.repeats,
            ", ".join(f"{n} {r[-1].images_per_s:.1f}" for n, r in runs.items()),
        )
    return {name: [asdict(m) for m in measured] for name, measured in runs.items()}


def _run_sweep(ctx: _Context) -> tuple[dict[int, Measurement], ...]:
    """Time the client path over batch sizes and over concurrency levels."""
    config = ctx.config
    by_batch: dict[int, Measurement] = {}
    ort_by_batch: dict[int, Measurement] = {}
    per_thread = max(1, config.sweep_requests // config.concurrency)
    for size in config.sweep_batch_sizes:
        images = ctx.tensors[:size]
        ctx.pool.measure(images, config.concurrency, 1)
        by_batch[size] = ctx.pool.measure(images, config.concurrency, per_thread)
        ort_by_batch[size] = measure_ort(ctx.session, images, config.sweep_requests)
    by_concurrency: dict[int, Measurement] = {}
    images = ctx.tensors[: config.batch_size]
    for level in config.sweep_concurrency:
        per_thread = max(2, -(-config.sweep_requests // level))
        ctx.pool.measure(images, level, 1)
        by_concurrency[level] = ctx.pool.measure(images, level, per_thread)
    return by_batch, ort_by_batch, by_concurrency


def run(config: ServingConfig, work_dir: Path) -> BenchResult:
    """Export ``cxr_resnet``, serve it and measure P2 and the serving sweep.

    Parameters
    ----------
    config : ServingConfig
        Batch sizes, concurrency, repeats and sweep points.
    work_dir : pathlib.Path
        Folder for the model repository, the server log and perf_analyzer's files.

    Returns
    -------
    BenchResult
        Ratios ``p2a`` (client ÷ in-process ONNX Runtime) and ``p2b`` (client ÷
        perf_analyzer), plots of the sweep and every measurement in ``raw``.

    Raises
    ------
    clinfer.errors.ConfigurationError
        If perf_analyzer, its CUDA runtime library or the Triton binary is missing.
    clinfer.errors.ClinferError
        If the export, the server or a measurement fails.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    options = server_options(config)
    repo = work_dir / "model_repository"
    exported = export_cxr_model(repo, options=options)
    onnx_path = repo / CXR_MODEL_NAME / str(exported.version) / "model.onnx"
    largest = max(config.batch_size, *config.sweep_batch_sizes)
    tensors = load_tensors(largest)
    session = ort_session(onnx_path, options)
    # Fail before the server starts when perf_analyzer cannot run.
    perf_analyzer_binary()
    perf_analyzer_env()
    clients = max(config.concurrency, *config.sweep_concurrency)
    log_file = work_dir / "tritonserver.log"
    with EmbeddedTritonServer(
        repo, http_port=0, grpc_port=0, metrics_port=0, log_file=log_file
    ) as server:
        probe = TritonModelClient(server.grpc_url, CXR_MODEL_NAME)
        try:
            probe.wait_ready()
            spec = probe.fetch_spec()
        finally:
            probe.close()
        input_data = write_input_data(
            work_dir / "perf_input.json", tensors[: config.batch_size], spec.input_name
        )
        perf = PerfAnalyzerRun(
            server.grpc_url, spec.name, input_data, work_dir, config.perf_request_count
        )
        pool = ClientPool(server.grpc_url, spec, clients)
        shm_clients: list[SharedMemoryClient] = []
        try:
            if config.shared_memory:
                for index in range(config.concurrency):
                    tag = f"{os.getpid()}_{index}"
                    shm_clients.append(
                        SharedMemoryClient(
                            server.grpc_url, spec, config.batch_size, tag
                        )
                    )
            ctx = _Context(config, spec, pool, session, tensors, perf)
            p2 = _run_p2(ctx, shm_clients)
            sweep = _run_sweep(ctx)
        finally:
            for client in shm_clients:
                client.close()
            pool.close()
    return _result(config, options, p2, *sweep)


def _result(
    config: ServingConfig,
    options: TritonConfigOptions,
    p2: dict[str, list[dict[str, Any]]],
    by_batch: dict[int, Measurement],
    ort_by_batch: dict[int, Measurement],
    by_concurrency: dict[int, Measurement],
) -> BenchResult:
    """Assemble ratios, plots, the chosen operating point and the raw figures."""
    medians = {
        name: float(statistics.median(r["images_per_s"] for r in runs))
        for name, runs in p2.items()
    }
    setting = f"batch {config.batch_size}, concurrency {config.concurrency}"
    ratios = [
        _ratio(
            "p2a",
            medians["client"],
            medians["ort"],
            f"clinfer gRPC client ÷ in-process ONNX Runtime ({setting}, "
            f"{config.threads} threads)",
            TARGET_RATIO,
        ),
        _ratio(
            "p2b",
            medians["client"],
            medians["perf_analyzer"],
            f"clinfer gRPC client ÷ perf_analyzer ({setting})",
            TARGET_RATIO,
        ),
    ]
    notes = [
        f"Server and in-process ONNX Runtime both use {config.threads} intra-op "
        "threads, 1 inter-op thread and allow_spinning "
        f"{int(options.allow_spinning)}; the server has one instance, "
        f"max_batch_size {options.max_batch_size} and preferred batch sizes "
        f"{list(options.preferred_batch_sizes)}, so its dynamic batcher may merge "
        "concurrent requests.",
        "perf_analyzer sends the same preprocessed tensors (--input-data JSON, "
        "base64) over gRPC in count_windows mode with the stability check relaxed.",
    ]
    if "client_shm" in medians:
        ratios += [
            _ratio(
                "p2a_shm",
                medians["client_shm"],
                medians["ort"],
                f"gRPC client with system shared memory ÷ in-process ONNX Runtime "
                f"({setting})",
                None,
            ),
            _ratio(
                "shm_gain",
                medians["client_shm"],
                medians["client"],
                f"gRPC client with system shared memory ÷ without ({setting})",
                None,
            ),
        ]
        gain = medians["client_shm"] / medians["client"]
        verdict = "helped" if gain > 1.0 + config.within_peak else "did not help"
        notes.append(
            f"System shared memory {verdict}: {gain:.2f}x the plain gRPC client."
        )

    chosen_batch, batch_peak = smallest_within_peak(by_batch, config.within_peak)
    chosen_level, level_peak = smallest_within_peak(by_concurrency, config.within_peak)
    default = workers_default_batch_size()
    chosen = {
        "batch_size": chosen_batch,
        "concurrency": chosen_level,
        "rule": (
            f"smallest batch size (at concurrency {config.concurrency}) and smallest "
            f"concurrency (at batch {config.batch_size}) within "
            f"{config.within_peak:.0%} of the peak images/s of the client path"
        ),
        "workers_default_batch_size": default,
        "matches_workers_default": default == chosen_batch,
    }
    plots = _plots(config, medians, by_batch, ort_by_batch, by_concurrency)
    raw = {
        "config": asdict(config),
        "threads": config.threads,
        "server_options": asdict(options),
        "machine": machine_info(),
        "p2_runs": p2,
        "p2_medians_images_per_s": medians,
        "sweep_batch": {str(k): asdict(m) for k, m in by_batch.items()},
        "sweep_batch_ort": {str(k): asdict(m) for k, m in ort_by_batch.items()},
        "sweep_concurrency": {str(k): asdict(m) for k, m in by_concurrency.items()},
        "sweep_batch_peak_images_per_s": batch_peak,
        "sweep_concurrency_peak_images_per_s": level_peak,
    }
    return BenchResult(
        name="p2",
        title="Serving throughput: clinfer client vs ONNX Runtime and perf_analyzer",
        command="clinfer bench serving",
        ratios=ratios,
        plots=plots,
        raw=raw,
        chosen=chosen,
        notes=notes,
    )


def _plots(
    config: ServingConfig,
    medians: dict[str, float],
    by_batch: dict[int, Measurement],
    ort_by_batch: dict[int, Measurement],
    by_concurrency: dict[int, Measurement],
) -> list[Plot]:
    sizes = sorted(by_batch)
    levels = sorted(by_concurrency)
    names = list(medians)
    return [
        Plot(
            name="p2_paths",
            title=f"P2: median images/s per path (batch {config.batch_size})",
            x_label="path",
            y_label="images/s",
            series=[
                Series(
                    "median images/s",
                    [float(i) for i in range(len(names))],
                    [medians[n] for n in names],
                )
            ],
            categories=names,
        ),
        Plot(
            name="serving_throughput_vs_batch",
            title=f"Throughput vs batch size (concurrency {config.concurrency})",
            x_label="batch size",
            y_label="images/s",
            series=[
                Series(
                    "clinfer gRPC client",
                    [float(s) for s in sizes],
                    [by_batch[s].images_per_s for s in sizes],
                ),
                Series(
                    "in-process ONNX Runtime",
                    [float(s) for s in sizes],
                    [ort_by_batch[s].images_per_s for s in sizes],
                ),
            ],
            log_x=True,
        ),
        Plot(
            name="serving_latency_vs_concurrency",
            title=f"Request latency percentiles vs concurrency (batch {config.batch_size})",
            x_label="concurrent client threads",
            y_label="latency (ms)",
            series=[
                Series(
                    label,
                    [float(c) for c in levels],
                    [getattr(by_concurrency[c], field) for c in levels],
                )
                for label, field in (
                    ("p50", "p50_ms"),
                    ("p95", "p95_ms"),
                    ("p99", "p99_ms"),
                )
            ],
        ),
    ]
