"""Scoring-job throughput against an in-process loop, and job memory against job size.

- P1: instances per second of the full job (DICOM files on disk to rows in SQLite,
  through Ray and the embedded Triton server) divided by a plain multiprocessing loop
  that decodes, preprocesses and runs ONNX Runtime in process on the same files and
  cores. Runs are interleaved (baseline, job, baseline, job, ...) and the medians are
  compared, after one warm-up of each.
- P5: peak memory (proportional set size) of a job on a large set divided by a job
  on a set ten times smaller, summed over the job's whole process tree (driver, Ray
  services and workers; the Triton server is external to the job and not counted).

Run ``python -m clinfer.bench.pipeline --help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from clinfer.bench.synthetic import write_copies
from clinfer.export.cxr import CXR_MODEL_NAME, export_cxr_model
from clinfer.workers.pipeline import JobOptions, run_job

from clinfer.server import EmbeddedTritonServer

logger = logging.getLogger(__name__)

_session: Any = None


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


def run_baseline(paths: list[Path], onnx_path: Path, *, processes: int) -> float:
    """Return instances per second of the in-process multiprocessing loop."""
    chunks = [[str(p) for p in paths[i::processes]] for i in range(processes)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(
        processes, initializer=_init_worker, initargs=(str(onnx_path),)
    ) as pool:
        pool.map(_score_chunk, [c[:4] for c in chunks])  # load modules and sessions
        start = time.perf_counter()
        scored = sum(pool.map(_score_chunk, chunks))
        elapsed = time.perf_counter() - start
    return scored / elapsed


def run_pipeline(paths_dir: Path, url: str, out_dir: Path) -> float:
    """Return instances per second of one scoring job, Ray start-up included."""
    start = time.perf_counter()
    summary = run_job(
        JobOptions(
            paths=[str(paths_dir)],
            out_dir=out_dir,
            triton_urls=[url],
            model=CXR_MODEL_NAME,
        )
    )
    elapsed = time.perf_counter() - start
    return summary.instances_scored / elapsed


def measure_throughput(count: int, repeats: int, work_dir: Path) -> dict[str, Any]:
    """Measure P1 on ``count`` synthetic instances, ``repeats`` interleaved runs each."""
    data = work_dir / f"copies_{count}"
    paths = write_copies(data, count)
    repository = work_dir / "model_repository"
    export_cxr_model(repository)
    onnx_path = repository / CXR_MODEL_NAME / "1" / "model.onnx"
    processes = os.cpu_count() or 1

    baseline: list[float] = []
    pipeline: list[float] = []
    server = EmbeddedTritonServer(
        repository,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        log_file=work_dir / "tritonserver.log",
    )
    with server:
        for run in range(repeats + 1):
            b = run_baseline(paths, onnx_path, processes=processes)
            p = run_pipeline(data, server.grpc_url, work_dir / f"job_{run}")
            if run == 0:
                continue  # warm-up
            baseline.append(b)
            pipeline.append(p)
    result = {
        "instances": count,
        "repeats": repeats,
        "processes": processes,
        "baseline_instances_per_s": baseline,
        "pipeline_instances_per_s": pipeline,
        "baseline_median": statistics.median(baseline),
        "pipeline_median": statistics.median(pipeline),
    }
    result["p1_ratio"] = result["pipeline_median"] / result["baseline_median"]
    return result


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


def measure_memory(small: int, large: int, work_dir: Path, url: str) -> dict[str, Any]:
    """Measure P5: peak PSS of a ``large``-instance job over a ``small``-instance one."""
    peaks = {}
    for count in (small, large):
        data = work_dir / f"copies_{count}"
        write_copies(data, count)
        command = [
            str(Path(sys.executable).with_name("clinfer")),
            "score",
            str(data),
            "--out",
            str(work_dir / f"memory_{count}"),
            "--triton-url",
            url,
        ]
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        peak = 0
        while process.poll() is None:
            peak = max(peak, _tree_pss_bytes(process.pid))
            time.sleep(0.2)
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}")
        peaks[count] = peak
    return {
        "small_instances": small,
        "large_instances": large,
        "small_peak_pss_bytes": peaks[small],
        "large_peak_pss_bytes": peaks[large],
        "p5_ratio": peaks[large] / peaks[small],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--instances",
        type=int,
        default=1000,
        help="instances per P1 run (default 1000)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="interleaved P1 runs after the warm-up (default 3)",
    )
    parser.add_argument(
        "--memory",
        nargs=2,
        type=int,
        metavar=("SMALL", "LARGE"),
        default=None,
        help="also run P5 with these two set sizes, for example 1000 10000",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="folder for generated data and results (default: temp)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="clinfer-bench-"))
    result: dict[str, Any] = {
        "p1": measure_throughput(args.instances, args.repeats, work_dir)
    }
    if args.memory:
        repository = work_dir / "model_repository"
        with EmbeddedTritonServer(
            repository,
            http_port=0,
            grpc_port=0,
            metrics_port=0,
            log_file=work_dir / "tritonserver-memory.log",
        ) as server:
            result["p5"] = measure_memory(*args.memory, work_dir, server.grpc_url)

    p1 = result["p1"]
    print(
        f"P1 pipeline / in-process loop: {p1['p1_ratio']:.2f} "
        f"({p1['pipeline_median']:.1f} vs {p1['baseline_median']:.1f} instances/s, "
        f"{p1['instances']} instances, median of {p1['repeats']}, "
        f"{p1['processes']} processes)"
    )
    if "p5" in result:
        p5 = result["p5"]
        print(
            f"P5 peak PSS {p5['large_instances']} / {p5['small_instances']} instances: "
            f"{p5['p5_ratio']:.2f} ({p5['large_peak_pss_bytes'] / 2**20:.0f} MiB vs "
            f"{p5['small_peak_pss_bytes'] / 2**20:.0f} MiB)"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
