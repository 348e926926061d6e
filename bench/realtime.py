"""Real-time latency under a saturating batch load, for several serving designs.

For each design the benchmark writes a model repository, starts an embedded Triton
server on it and measures, in interleaved repeats after a warm-up:

- ``idle``: real-time requests (one frame, priority 1) with no other load;
- ``batch``: batch clients alone, each a thread sending ``batch_size``-frame requests
  at priority 2 back to back (frames per second);
- ``loaded``: the same batch clients plus the real-time requests.

It reports real-time p50/p99 idle and loaded, their ratio, and the batch throughput
kept under real-time load (loaded over alone). Latency is the client's gRPC round trip
of a preprocessed tensor; DICOM reading and preprocessing are not included.

The ``multimodal_*`` designs serve the trained composition instead of ``cxr_resnet``:
requests carry an image and an EMR row, and throughput counts studies per second.
Their repository is published from an existing export (``multimodal_repository``)
or, by default, from models trained briefly on a small synthetic cohort, since
latency does not depend on what the weights learned.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc
from clinfer.export.composition import (
    COMPOSING_MODELS,
    COMPOSITION_NAME,
    OUTPUT_NAMES,
    PRIORITY_PARAMETER,
    publish_composing_model,
    publish_composition,
)
from clinfer.export.cxr import CXR_MODEL_NAME, export_cxr_model
from clinfer.export.multimodal import export_trained_models
from clinfer.export.repository import (
    BATCH_PRIORITY,
    REALTIME_PRIORITY,
    REALTIME_SUFFIX,
    TritonConfigOptions,
    existing_versions,
    render_config,
    write_realtime_model,
)
from clinfer.export.served_repository import SPEC_FILE, ServingOptions, read_spec

from clinfer.errors import ClinferError, ConfigurationError
from clinfer.server import EmbeddedTritonServer
from clinfer.train.cohort import generate_cohort
from clinfer.train.emr import EMR_FEATURES
from clinfer.train.training import TrainConfig, train_all

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Design:
    """One way of serving the model, as the config options of the batch model.

    With ``options.realtime_model`` the repository also has ``<name>_realtime`` on
    the same ONNX file (see ``clinfer.export.repository.write_realtime_model``), and
    real-time requests go there. A design with ``serving`` serves the multimodal
    composition with those options instead, and ``options`` is unused.
    """

    name: str
    description: str
    options: TritonConfigOptions
    serving: ServingOptions | None = None

    @property
    def batch_model(self) -> str:
        """The Triton model that batch requests are sent to."""
        return CXR_MODEL_NAME if self.serving is None else COMPOSITION_NAME

    @property
    def realtime_model(self) -> str:
        """The Triton model that real-time requests are sent to."""
        if self.serving is None:
            copy = self.options.realtime_model
        else:
            copy = self.serving.realtime_models
        return self.batch_model + (REALTIME_SUFFIX if copy else "")

    @property
    def max_batch_size(self) -> int:
        """The batch model's maximum batch size."""
        if self.serving is None:
            return self.options.max_batch_size
        return self.serving.max_batch_size


# Designs start from one model at the default nice value with ONNX Runtime's default
# thread spinning, whatever the export defaults are.
PLAIN_OPTIONS = replace(
    TritonConfigOptions(), realtime_model=False, process_nice=0, allow_spinning=True
)


def _options(**changes: Any) -> TritonConfigOptions:
    return replace(PLAIN_OPTIONS, **changes)


DESIGNS: dict[str, Design] = {
    design.name: design
    for design in (
        Design(
            "priority",
            "one model, one instance, priority levels and queue policy only",
            PLAIN_OPTIONS,
        ),
        Design(
            "priority_1thread",
            "one model, one instance with one ONNX Runtime thread",
            _options(intra_op_threads=1),
        ),
        Design(
            "small_batch",
            "one model, one instance, max batch 8 so a running batch is shorter",
            _options(max_batch_size=8, preferred_batch_sizes=(8,)),
        ),
        Design(
            "two_instances",
            "one model, two instances of one ONNX Runtime thread each",
            _options(instance_count=2, intra_op_threads=1),
        ),
        Design(
            "realtime_model",
            "batch model and a dedicated real-time model on the same ONNX file",
            _options(realtime_model=True),
        ),
        Design(
            "realtime_model_1thread",
            "dedicated real-time model; batch model with one ORT thread",
            _options(realtime_model=True, intra_op_threads=1),
        ),
        Design(
            "realtime_model_nice",
            "dedicated real-time model; batch model's stub process at nice 19",
            _options(realtime_model=True, process_nice=19),
        ),
        Design(
            "realtime_model_nice_1thread",
            "dedicated real-time model; batch model at nice 19 with one ORT thread",
            _options(realtime_model=True, process_nice=19, intra_op_threads=1),
        ),
        Design(
            "realtime_model_nospin",
            "dedicated real-time model; no ONNX Runtime thread spinning",
            _options(realtime_model=True, allow_spinning=False),
        ),
        Design(
            "realtime_model_nice_nospin",
            "dedicated real-time model; batch at nice 19; no ORT thread spinning",
            _options(realtime_model=True, process_nice=19, allow_spinning=False),
        ),
        Design(
            "multimodal_priority",
            "multimodal composition alone; real-time requests at priority 1 share "
            "the composing models' instances with batch work",
            PLAIN_OPTIONS,
            ServingOptions(realtime_models=False),
        ),
        Design(
            "multimodal_realtime",
            "multimodal composition and _realtime copies of it and of the models "
            "it calls, each on its own instance",
            PLAIN_OPTIONS,
            ServingOptions(realtime_models=True),
        ),
    )
}
MULTIMODAL_DESIGNS = tuple(name for name, d in DESIGNS.items() if d.serving)


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and durations of one benchmark run."""

    designs: tuple[str, ...] = tuple(DESIGNS)
    batch_clients: int = 6
    batch_size: int = 32
    realtime_requests: int = 60
    """Real-time requests per phase and repeat."""
    realtime_gap_s: float = 0.1
    """Pause after each real-time response, so about 9 requests per second."""
    batch_phase_s: float = 6.0
    repeats: int = 3
    warmup_requests: int = 5
    multimodal_repository: Path | None = None
    """Exported repository with the composition, for the multimodal designs; when
    None, one is trained and exported from a synthetic cohort."""
    multimodal_cohort_size: int = 60
    """Patients of that synthetic cohort."""


@dataclass
class DesignResult:
    """Measurements of one design, pooled over the repeats."""

    design: str
    description: str
    idle_ms: list[float] = field(default_factory=list)
    loaded_ms: list[float] = field(default_factory=list)
    batch_alone_fps: list[float] = field(default_factory=list)
    batch_loaded_fps: list[float] = field(default_factory=list)
    errors: int = 0

    def summary(self) -> dict[str, Any]:
        """Percentiles in ms, throughputs in frames/s and the ratios."""
        idle = np.asarray(self.idle_ms)
        loaded = np.asarray(self.loaded_ms)
        alone = float(np.mean(self.batch_alone_fps)) if self.batch_alone_fps else 0.0
        kept = float(np.mean(self.batch_loaded_fps)) if self.batch_loaded_fps else 0.0
        idle_p99 = float(np.percentile(idle, 99)) if idle.size else float("nan")
        loaded_p99 = float(np.percentile(loaded, 99)) if loaded.size else float("nan")
        return {
            "design": self.design,
            "description": self.description,
            "idle_p50_ms": float(np.percentile(idle, 50)) if idle.size else None,
            "idle_p95_ms": float(np.percentile(idle, 95)) if idle.size else None,
            "idle_p99_ms": idle_p99,
            "loaded_p50_ms": float(np.percentile(loaded, 50)) if loaded.size else None,
            "loaded_p95_ms": float(np.percentile(loaded, 95)) if loaded.size else None,
            "loaded_p99_ms": loaded_p99,
            "p99_ratio": loaded_p99 / idle_p99 if idle_p99 else None,
            "batch_alone_fps": alone,
            "batch_loaded_fps": kept,
            "batch_kept_ratio": kept / alone if alone else None,
            "realtime_samples": [int(idle.size), int(loaded.size)],
            "errors": self.errors,
        }


def write_repository(root: Path, design: Design, base: Path) -> Path:
    """Copy the exported model of ``base`` into ``root`` with the design's configs.

    For a multimodal design ``base`` is a repository with the composition, and its
    composing models and the composition are published again with
    ``design.serving``.

    Returns
    -------
    Path
        The repository folder.

    Raises
    ------
    ConfigurationError
        If ``base`` lacks a model that the design serves.
    clinfer.errors.ExportError
        If the repository cannot be written.
    """
    if design.serving is not None:
        return _write_multimodal_repository(root, design.serving, base)
    source = base / CXR_MODEL_NAME
    spec = json.loads((source / "clinfer.json").read_text())
    target = root / CXR_MODEL_NAME
    shutil.copytree(source, target)
    (target / "config.pbtxt").write_text(
        render_config(spec, backend="python", options=design.options)
    )
    if design.options.realtime_model:
        write_realtime_model(target, spec, design.options)
    return root


def _write_multimodal_repository(
    root: Path, serving: ServingOptions, base: Path
) -> Path:
    versions = {}
    specs = {}
    for name in COMPOSING_MODELS:
        spec = read_spec(base / name)
        published = existing_versions(base / name)
        if spec is None or not published:
            raise ConfigurationError(
                f"{base} has no published {name}; export the trained models with "
                "`clinfer export-trained` first"
            )
        folder = base / name / str(published[-1])
        files = {
            path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()
        }
        info = spec.get("versions", {}).get(str(published[-1]), {})
        info = {key: value for key, value in info.items() if key != "sha256"}
        spec = {key: value for key, value in spec.items() if key != "versions"}
        versions[name], _ = publish_composing_model(
            root, spec, files, version_info=info, options=serving
        )
        specs[name] = json.loads((root / name / SPEC_FILE).read_text())
    publish_composition(root, specs, versions, serving)
    return root


def _random_inputs(
    design: Design, batch_size: int, seed: int
) -> list[triton_grpc.InferInput]:
    rng = np.random.default_rng(seed)
    arrays = {"image": rng.random((batch_size, 1, 224, 224), dtype=np.float32)}
    if design.serving is not None:
        # Raw EMR values; the composition standardises them.
        arrays["emr"] = rng.random((batch_size, len(EMR_FEATURES)), dtype=np.float32)
    tensors = []
    for name, array in arrays.items():
        tensor = triton_grpc.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def _request_kwargs(design: Design, priority: int, *, realtime: bool) -> dict:
    """Return the model, outputs, priority and parameters of one request."""
    if design.serving is None:
        model = design.realtime_model if realtime else design.batch_model
        return {
            "model_name": model,
            "outputs": [triton_grpc.InferRequestedOutput("probabilities")],
            "priority": priority,
        }
    # Real-time clients read every output, saliency included; batch jobs without
    # DICOM outputs read the three probabilities.
    names = OUTPUT_NAMES if realtime else OUTPUT_NAMES[:3]
    return {
        "model_name": design.realtime_model if realtime else design.batch_model,
        "outputs": [triton_grpc.InferRequestedOutput(name) for name in names],
        "priority": priority,
        "parameters": {PRIORITY_PARAMETER: priority},
    }


class BatchLoad:
    """Threads that send batch-priority requests back to back until stopped."""

    def __init__(self, url: str, design: Design, clients: int, batch_size: int):
        self.url = url
        self.design = design
        self.clients = clients
        self.batch_size = batch_size
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.frames = 0
        self.errors = 0

    def _run(self) -> None:
        client = triton_grpc.InferenceServerClient(self.url)
        tensors = _random_inputs(self.design, self.batch_size, seed=0)
        kwargs = _request_kwargs(self.design, BATCH_PRIORITY, realtime=False)
        try:
            while not self._stop.is_set():
                try:
                    client.infer(inputs=tensors, **kwargs)
                except Exception as exc:  # counted and logged; the load continues
                    with self._lock:
                        self.errors += 1
                    logger.warning("batch request failed: %s", exc)
                    time.sleep(0.1)
                    continue
                with self._lock:
                    self.frames += self.batch_size
        finally:
            client.close()

    def start(self) -> None:
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._run, daemon=True) for _ in range(self.clients)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60.0)

    def reset(self) -> int:
        with self._lock:
            frames, self.frames = self.frames, 0
        return frames


def _realtime_latencies(
    client: triton_grpc.InferenceServerClient,
    design: Design,
    count: int,
    gap_s: float,
) -> tuple[list[float], int]:
    tensors = _random_inputs(design, 1, seed=1)
    kwargs = _request_kwargs(design, REALTIME_PRIORITY, realtime=True)
    latencies: list[float] = []
    errors = 0
    for _ in range(count):
        sent = time.perf_counter()
        try:
            client.infer(inputs=tensors, **kwargs)
        except Exception as exc:  # counted and logged; the run continues
            errors += 1
            logger.warning("real-time request failed: %s", exc)
            continue
        latencies.append((time.perf_counter() - sent) * 1000.0)
        time.sleep(gap_s)
    return latencies, errors


def measure_design(
    design: Design, base: Path, config: BenchConfig, work: Path
) -> DesignResult:
    """Start a server for one design and run the interleaved phases.

    Raises
    ------
    ClinferError
        If the server does not start.
    """
    repository = write_repository(work / design.name, design, base)
    result = DesignResult(design.name, design.description)
    clients = config.batch_clients
    with EmbeddedTritonServer(
        repository,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        log_file=work / f"{design.name}.log",
    ) as server:
        client = triton_grpc.InferenceServerClient(server.grpc_url)
        # A request larger than the model's max batch size would be rejected.
        batch_size = min(config.batch_size, design.max_batch_size)
        load = BatchLoad(server.grpc_url, design, clients, batch_size)
        try:
            _realtime_latencies(client, design, config.warmup_requests, 0.0)
            load.start()
            time.sleep(1.0)
            load.stop()
            load.reset()
            for _ in range(config.repeats):
                latencies, errors = _realtime_latencies(
                    client,
                    design,
                    config.realtime_requests,
                    config.realtime_gap_s,
                )
                result.idle_ms += latencies
                result.errors += errors

                load.start()
                started = time.perf_counter()
                time.sleep(config.batch_phase_s)
                result.batch_alone_fps.append(
                    load.reset() / (time.perf_counter() - started)
                )

                started = time.perf_counter()
                latencies, errors = _realtime_latencies(
                    client,
                    design,
                    config.realtime_requests,
                    config.realtime_gap_s,
                )
                result.batch_loaded_fps.append(
                    load.reset() / (time.perf_counter() - started)
                )
                load.stop()
                load.reset()
                result.loaded_ms += latencies
                result.errors += errors
        finally:
            load.stop()
            client.close()
    result.errors += load.errors
    return result


# Short training: the multimodal designs measure latency, which does not depend on
# what the weights learned.
BENCH_TRAINING = TrainConfig(image_epochs=1, tabular_epochs=5, fusion_epochs=5)


def _base_repository(multimodal: bool, config: BenchConfig, work: Path) -> Path:
    if not multimodal:
        base = work / "base"
        export_cxr_model(base)
        return base
    if config.multimodal_repository is not None:
        return Path(config.multimodal_repository)
    logger.info(
        "training the multimodal models on a %d-patient synthetic cohort",
        config.multimodal_cohort_size,
    )
    cohort = generate_cohort(config.multimodal_cohort_size, work / "mm_cohort", seed=0)
    train_all(cohort.root, work / "mm_models", seed=0, config=BENCH_TRAINING)
    base = work / "mm_base"
    export_trained_models(
        work / "mm_models",
        cohort.root,
        base,
        seed=0,
        tensorrt=False,
        options=ServingOptions(realtime_models=False),
    )
    return base


def run_bench(
    config: BenchConfig,
    out_json: Path,
    *,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure every design of ``config`` and write the summaries as JSON.

    Parameters
    ----------
    config : BenchConfig
        Designs, load and durations.
    out_json : Path
        File to write: ``{"config": ..., "results": [...]}``.
    report : callable, optional
        Called with each design's summary as soon as it is measured.

    Returns
    -------
    list of dict
        One summary per design (see :meth:`DesignResult.summary`).

    Raises
    ------
    ClinferError
        If a design name is unknown, the export or training fails, or a server does
        not start.
    """
    unknown = [name for name in config.designs if name not in DESIGNS]
    if unknown:
        raise ClinferError(
            f"unknown design(s) {unknown}; choose from {sorted(DESIGNS)}."
        )
    summaries: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="clinfer-bench-") as tmp:
        work = Path(tmp)
        bases: dict[bool, Path] = {}
        for name in config.designs:
            design = DESIGNS[name]
            multimodal = design.serving is not None
            if multimodal not in bases:
                bases[multimodal] = _base_repository(multimodal, config, work)
            logger.info("measuring design %s", name)
            summary = measure_design(design, bases[multimodal], config, work).summary()
            summaries.append(summary)
            if report is not None:
                report(summary)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(
        # default=str writes the optional repository Path as text.
        json.dumps(
            {"config": asdict(config), "results": summaries}, indent=2, default=str
        )
    )
    return summaries


def tiny_config(designs: Sequence[str] = ("priority",)) -> BenchConfig:
    """Return a configuration that runs in seconds, for tests and smoke runs.

    NOTE: multimodal designs without ``multimodal_repository`` first train and
    export their models, which took about a minute on a shared 2-core machine.
    """
    return replace(
        BenchConfig(),
        designs=tuple(designs),
        batch_clients=1,
        batch_size=2,
        realtime_requests=3,
        realtime_gap_s=0.0,
        batch_phase_s=0.3,
        repeats=1,
        warmup_requests=1,
    )
