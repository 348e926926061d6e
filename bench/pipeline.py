"""Scoring-job throughput against an in-process loop (P1) and job memory (P5).

- P1: instances per second of the full job (DICOM files on disk to rows in SQLite,
  through Ray and the embedded Triton server) divided by a plain multiprocessing loop
  that decodes, preprocesses and runs ONNX Runtime in process on the same files and
  cores. After one warm-up of each, runs are interleaved (loop, job, loop, job, ...)
  and the medians are compared. Target: at least 0.95.
- P5: peak memory (proportional set size) of a ``clinfer score`` job on a large set
  divided by a job on a set ten times smaller, summed over the job's whole process
  tree (driver, Ray services and workers). The Triton server is outside the job and
  not counted. Target: at most 1.1.

Run ``clinfer bench pipeline`` and ``clinfer bench memory``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from clinfer.bench.schema import BenchResult, Plot, Ratio, Series
from clinfer.bench.synthetic import write_copies
from clinfer.export.cxr import CXR_MODEL_NAME, export_cxr_model
from clinfer.workers.pipeline import JobOptions, run_job

from clinfer.errors import ClinferError
from clinfer.server import EmbeddedTritonServer

logger = logging.getLogger(__name__)

P1_TARGET = 0.95
P5_TARGET = 1.1
MIB = 2**20

_session: Any = None


@dataclass(frozen=True)
class PipelineConfig:
    """Sizes of one P1 run."""

    instances: int = 5000
    """Synthetic instances (copies of MR_small.dcm) scored per run. A job has a
    fixed cost of a few seconds (actor start-up, header pass) that a department's
    tens of thousands of studies amortise, so runs are not made too short."""
    repeats: int = 3
    """Interleaved runs of each side after the warm-up."""
    batch_size: int = 32
    """Frames per Triton request of the job and per ONNX Runtime call of the loop."""
    processes: int | None = None
    """Processes of the multiprocessing loop; ``None`` for one per CPU."""

    @classmethod
    def small(cls) -> PipelineConfig:
        """Return a configuration that runs in well under a minute on 2 cores."""
        return cls(instances=16, repeats=1)

    @property
    def command(self) -> str:
        """The ``clinfer bench pipeline`` command line of this configuration."""
        return (
            f"clinfer bench pipeline --instances {self.instances} "
            f"--repeats {self.repeats} --batch-size {self.batch_size}"
        )


@dataclass(frozen=True)
class MemoryConfig:
    """Sizes of one P5 run."""

    small_instances: int = 1000
    large_instances: int = 10000
    repeats: int = 1
    """Interleaved runs of each size (small, large, small, ...); medians compared."""
    sample_interval_s: float = 0.2
    """Seconds between two PSS samples of the job's process tree."""

    @classmethod
    def small(cls) -> MemoryConfig:
        """Return a configuration that runs in well under a minute on 2 cores."""
        return cls(small_instances=10, large_instances=100)

    @property
    def command(self) -> str:
        """The ``clinfer bench memory`` command line of this configuration."""
        return (
            f"clinfer bench memory --small-instances {self.small_instances} "
            f"--large-instances {self.large_instances} --repeats {self.repeats}"
        )


def _init_worker(onnx_path: str) -> None:
    import onnxruntime as ort

    global _session
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    _session = ort.InferenceSession(
        onnx_path, options, providers=["CPUExecutionProvider"]
    )


def _score_chunk(paths: list[str], batch_size: int = 32) -> int:
    from clinfer.workers.preprocess import PreprocessConfig, load_and_preprocess

    config = PreprocessConfig()
    frames = []
    scored = 0
    for path in paths:
        frames.append(load_and_preprocess(path, config).frames)
        if sum(f.shape[0] for f in frames) >= batch_size:
            _session.run(None, {"image": np.concatenate(frames)})
            scored += len(frames)
            frames = []
    if frames:
        _session.run(None, {"image": np.concatenate(frames)})
        scored += len(frames)
    return scored


def run_baseline(
    paths: list[Path], onnx_path: Path, *, processes: int, batch_size: int = 32
) -> float:
    """Score ``paths`` with a multiprocessing loop and return instances per second.

    Pool start-up and each worker's first ONNX Runtime session are excluded, so the
    baseline is the loop's steady state.
    """
    chunks = [[str(p) for p in paths[i::processes]] for i in range(processes)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(
        processes, initializer=_init_worker, initargs=(str(onnx_path),)
    ) as pool:
        pool.starmap(_score_chunk, [(c[:4], batch_size) for c in chunks])
        start = time.perf_counter()
        scored = sum(pool.starmap(_score_chunk, [(c, batch_size) for c in chunks]))
        elapsed = time.perf_counter() - start
    return scored / elapsed


def run_pipeline(
    data_dir: Path, url: str, out_dir: Path, *, batch_size: int = 32
) -> float:
    """Run one scoring job on ``data_dir`` and return instances per second.

    The time includes Ray start-up (first job of a process only) and the header pass.

    Raises
    ------
    ClinferError
        If the job fails or scores no instance.
    """
    start = time.perf_counter()
    summary = run_job(
        JobOptions(
            paths=[str(data_dir)],
            out_dir=out_dir,
            triton_urls=[url],
            model=CXR_MODEL_NAME,
            batch_size=batch_size,
        )
    )
    elapsed = time.perf_counter() - start
    if summary.instances_scored == 0:
        raise ClinferError(
            f"the job on {data_dir} scored no instance; see the failures table of "
            f"{out_dir / 'results.sqlite'}."
        )
    return summary.instances_scored / elapsed


def _server(repository: Path, log_file: Path) -> EmbeddedTritonServer:
    return EmbeddedTritonServer(
        repository, http_port=0, grpc_port=0, metrics_port=0, log_file=log_file
    )


def run_p1(config: PipelineConfig, work_dir: Path) -> BenchResult:
    """Measure P1: the scoring job's instances/s over the multiprocessing loop's.

    Parameters
    ----------
    config : PipelineConfig
        Number of instances, repeats and batch size.
    work_dir : Path
        Folder for the synthetic instances, the model repository and job results.

    Returns
    -------
    BenchResult
        Ratio ``p1`` with target 0.95, the per-repeat figures and a bar plot.

    Raises
    ------
    ClinferError
        If the export, the server or a job fails.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    data = work_dir / f"copies_{config.instances}"
    paths = write_copies(data, config.instances)
    repository = work_dir / "model_repository"
    export_cxr_model(repository)
    onnx_path = repository / CXR_MODEL_NAME / "1" / "model.onnx"
    processes = config.processes or os.cpu_count() or 1

    baseline: list[float] = []
    pipeline: list[float] = []
    with _server(repository, work_dir / "tritonserver-p1.log") as server:
        for run in range(config.repeats + 1):
            loop_rate = run_baseline(
                paths, onnx_path, processes=processes, batch_size=config.batch_size
            )
            job_rate = run_pipeline(
                data,
                server.grpc_url,
                work_dir / f"p1_job_{run}",
                batch_size=config.batch_size,
            )
            logger.info(
                "P1 run %d: loop %.1f, job %.1f instances/s", run, loop_rate, job_rate
            )
            if run == 0:
                continue  # warm-up
            baseline.append(loop_rate)
            pipeline.append(job_rate)

    baseline_median = statistics.median(baseline)
    pipeline_median = statistics.median(pipeline)
    repeats = [f"repeat {i + 1}" for i in range(config.repeats)]
    indices = [float(i) for i in range(config.repeats)]
    return BenchResult(
        name="p1",
        title="Scoring job against an in-process multiprocessing loop",
        command=config.command,
        ratios=[
            Ratio(
                name="p1",
                value=pipeline_median / baseline_median,
                numerator=pipeline_median,
                denominator=baseline_median,
                unit="instances/s",
                description=(
                    "job (Ray, Triton, SQLite) over a multiprocessing loop "
                    f"(decode, preprocess, ONNX Runtime in {processes} processes), "
                    f"median of {config.repeats}"
                ),
                target=P1_TARGET,
            )
        ],
        plots=[
            Plot(
                name="throughput",
                title="P1 instances/s per repeat",
                x_label="repeat",
                y_label="instances/s",
                series=[
                    Series("scoring job", indices, pipeline),
                    Series("multiprocessing loop", indices, baseline),
                ],
                categories=repeats,
            )
        ],
        raw={
            "instances": config.instances,
            "repeats": config.repeats,
            "batch_size": config.batch_size,
            "processes": processes,
            "baseline_instances_per_s": baseline,
            "pipeline_instances_per_s": pipeline,
            "baseline_median": baseline_median,
            "pipeline_median": pipeline_median,
        },
        notes=[
            "The job's time includes the header pass and Ray Data start-up of each "
            "job; the loop's excludes pool start-up.",
        ],
    )


def _tree_pss_bytes(pid: int) -> int:
    """Sum the proportional set size of ``pid`` and all its descendants, from /proc.

    PSS divides each shared page among the processes that map it, so Ray's shared
    object store is counted once rather than once per worker, as summed RSS would.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    total = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        total += _pss_bytes(current)
        stack.extend(children.get(current, []))
    return total


def _pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure_job_memory(
    data_dir: Path, out_dir: Path, url: str, *, interval_s: float = 0.2
) -> tuple[int, list[float], list[float]]:
    """Run ``clinfer score`` on ``data_dir`` and sample its process tree's PSS.

    Returns
    -------
    tuple
        Peak PSS in bytes, sample times in seconds since the start, and the samples
        in MiB.

    Raises
    ------
    ClinferError
        If the command exits with a non-zero status.
    """
    command = [
        str(Path(sys.executable).with_name("clinfer")),
        "score",
        str(data_dir),
        "--out",
        str(out_dir),
        "--triton-url",
        url,
    ]
    log_path = out_dir.with_name(out_dir.name + ".log")
    times: list[float] = []
    samples: list[float] = []
    peak = 0
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            pss = _tree_pss_bytes(process.pid)
            peak = max(peak, pss)
            times.append(time.perf_counter() - started)
            samples.append(pss / MIB)
            time.sleep(interval_s)
    if process.returncode != 0:
        raise ClinferError(
            f"{' '.join(command)} exited with status {process.returncode}; "
            f"see {log_path}."
        )
    return peak, times, samples


def run_p5(config: MemoryConfig, work_dir: Path) -> BenchResult:
    """Measure P5: peak PSS of the large job over the small job.

    Parameters
    ----------
    config : MemoryConfig
        The two set sizes, repeats and sampling interval.
    work_dir : Path
        Folder for the synthetic instances, the model repository and job results.

    Returns
    -------
    BenchResult
        Ratio ``p5`` with target 1.1 (lower is better) and a plot of PSS over time.

    Raises
    ------
    ClinferError
        If the export, the server or a job fails.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    repository = work_dir / "model_repository"
    export_cxr_model(repository)
    sizes = (config.small_instances, config.large_instances)
    for count in sizes:
        write_copies(work_dir / f"copies_{count}", count)

    peaks: dict[int, list[int]] = {count: [] for count in sizes}
    curves: dict[int, tuple[list[float], list[float]]] = {}
    with _server(repository, work_dir / "tritonserver-p5.log") as server:
        for run in range(config.repeats):
            for count in sizes:
                peak, times, samples = measure_job_memory(
                    work_dir / f"copies_{count}",
                    work_dir / f"p5_job_{count}_{run}",
                    server.grpc_url,
                    interval_s=config.sample_interval_s,
                )
                logger.info(
                    "P5 run %d: %d instances, peak PSS %.0f MiB",
                    run,
                    count,
                    peak / MIB,
                )
                peaks[count].append(peak)
                curves.setdefault(count, (times, samples))

    small_peak = statistics.median(peaks[config.small_instances])
    large_peak = statistics.median(peaks[config.large_instances])
    return BenchResult(
        name="p5",
        title="Job memory against job size",
        command=config.command,
        ratios=[
            Ratio(
                name="p5",
                value=large_peak / small_peak,
                numerator=large_peak / MIB,
                denominator=small_peak / MIB,
                unit="MiB",
                description=(
                    f"peak PSS of a {config.large_instances}-instance job over a "
                    f"{config.small_instances}-instance job, whole process tree"
                ),
                target=P5_TARGET,
                higher_is_better=False,
            )
        ],
        plots=[
            Plot(
                name="pss",
                title="PSS of the job's process tree (first run of each size)",
                x_label="seconds since start",
                y_label="PSS (MiB)",
                series=[
                    Series(f"{count} instances", *curves[count]) for count in sizes
                ],
            )
        ],
        raw={
            "small_instances": config.small_instances,
            "large_instances": config.large_instances,
            "repeats": config.repeats,
            "small_peak_pss_bytes": peaks[config.small_instances],
            "large_peak_pss_bytes": peaks[config.large_instances],
        },
        notes=["The Triton server runs outside the job and is not counted."],
    )
