"""Scoring-job throughput over batch size and Ray actor counts (``sweep_pipeline``).

Every point is one ``run_job`` on the same synthetic instances with these
``JobOptions`` settings changed: ``batch_size`` (frames per Triton request),
``infer_actors`` (Ray actors that decode, preprocess and send requests, one CPU each)
and ``decode_batch_size`` (instances per call of an actor). After a warm-up job, the points run in
interleaved repeats, each repeat in a rotated order so that no point always runs
first, and each point's median instances/s is reported.

Chosen point: the one with the highest median instances/s. Among the points within
``tolerance`` (5 %) of that median, the smallest batch size wins, then the fewest
actors, then the smallest decode batch, because smaller batches and fewer actors keep
latency and memory lower for the same throughput.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from clinfer.bench.schema import BenchResult, Plot, Ratio, Series
from clinfer.bench.synthetic import write_copies
from clinfer.export.cxr import CXR_MODEL_NAME, export_cxr_model
from clinfer.workers.pipeline import JobOptions, run_job

from clinfer.errors import ClinferError
from clinfer.server import EmbeddedTritonServer

logger = logging.getLogger(__name__)

# The JobOptions fields of a point, in the order of the point's tuple.
POINT_FIELDS = ("batch_size", "infer_actors", "decode_batch_size")

Point = tuple[int, int, int]


def default_point() -> Point | None:
    """Return the job's default (batch size, infer actors, decode batch size).

    Returns None when ``JobOptions`` lacks one of the fields or its default.
    """
    defaults = {item.name: item.default for item in fields(JobOptions)}
    values = [defaults.get(name, MISSING) for name in POINT_FIELDS]
    if any(value is MISSING for value in values):
        return None
    return (int(values[0]), int(values[1]), int(values[2]))


@dataclass(frozen=True)
class SweepConfig:
    """Grid and sizes of one pipeline sweep."""

    instances: int = 500
    """Synthetic instances (copies of MR_small.dcm) scored by each job."""
    batch_sizes: tuple[int, ...] = (8, 16, 32, 64)
    infer_actors: tuple[int, ...] = (1, 2, 4)
    decode_batch_sizes: tuple[int, ...] = (32,)
    repeats: int = 2
    """Interleaved runs of every point after the warm-up job."""
    tolerance: float = 0.05
    """Relative distance from the best median within which the cheapest point wins."""

    @classmethod
    def small(cls) -> SweepConfig:
        """Return a configuration that runs in well under a minute on 2 cores."""
        return cls(
            instances=16,
            batch_sizes=(8, 16),
            infer_actors=(1,),
            decode_batch_sizes=(8,),
            repeats=1,
        )

    @property
    def command(self) -> str:
        """The ``clinfer bench sweep`` command line of this configuration."""
        parts = ["clinfer bench sweep", f"--instances {self.instances}"]
        parts += [f"--batch-size {value}" for value in self.batch_sizes]
        parts += [f"--infer-actors {value}" for value in self.infer_actors]
        parts += [f"--decode-batch-size {value}" for value in self.decode_batch_sizes]
        parts.append(f"--repeats {self.repeats}")
        return " ".join(parts)

    def points(self) -> list[Point]:
        """Return every (batch size, infer actors, decode batch size) of the grid."""
        grid = [
            (batch, infer, decode)
            for decode in self.decode_batch_sizes
            for infer in self.infer_actors
            for batch in self.batch_sizes
        ]
        return list(dict.fromkeys(grid))


def choose_point(medians: dict[Point, float], tolerance: float) -> Point:
    """Pick the operating point by the rule in the module docstring.

    Raises
    ------
    ClinferError
        If ``medians`` is empty.
    """
    if not medians:
        raise ClinferError("the sweep measured no point; check its grid options.")
    best = max(medians.values())
    close = [point for point, rate in medians.items() if rate >= best * (1 - tolerance)]
    return min(close)


def _job_rate(data: Path, url: str, out_dir: Path, point: Point) -> float:
    started = time.perf_counter()
    summary = run_job(
        JobOptions(
            paths=[str(data)],
            out_dir=out_dir,
            triton_urls=[url],
            model=CXR_MODEL_NAME,
            **dict(zip(POINT_FIELDS, point, strict=True)),
        )
    )
    elapsed = time.perf_counter() - started
    if summary.instances_scored == 0:
        raise ClinferError(
            f"the sweep job on {data} scored no instance; see the failures table of "
            f"{out_dir / 'results.sqlite'}."
        )
    return summary.instances_scored / elapsed


def _label(infer: int, decode: int) -> str:
    return f"{infer} actors, decode batch {decode}"


def run(config: SweepConfig, work_dir: Path) -> BenchResult:
    """Measure the job's instances/s at every point of the grid.

    Parameters
    ----------
    config : SweepConfig
        Grid, job size, repeats and the tolerance of the choice rule.
    work_dir : Path
        Folder for the synthetic instances, the model repository and job results.

    Returns
    -------
    BenchResult
        ``sweep_pipeline`` with a plot of instances/s against batch size (one series
        per actor setting), the chosen point and its ratio over the job's defaults
        (or over the slowest point when the defaults are outside the grid).

    Raises
    ------
    ClinferError
        If the grid is empty, or the export, the server or a job fails.
    """
    points = config.points()
    if not points or config.repeats < 1:
        raise ClinferError(
            "the sweep grid is empty; give at least one batch size, infer actor "
            "count, decode batch size and repeat."
        )
    known = {item.name for item in fields(JobOptions)}
    missing = [name for name in POINT_FIELDS if name not in known]
    if missing:
        raise ClinferError(
            f"JobOptions has no field {missing}; update POINT_FIELDS in "
            f"{__name__} to the job's current settings."
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    data = work_dir / f"copies_{config.instances}"
    write_copies(data, config.instances)
    repository = work_dir / "model_repository"
    export_cxr_model(repository)

    rates: dict[Point, list[float]] = {point: [] for point in points}
    server = EmbeddedTritonServer(
        repository,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        log_file=work_dir / "tritonserver-sweep.log",
    )
    with server:
        _job_rate(data, server.grpc_url, work_dir / "sweep_warmup", points[0])
        for repeat in range(config.repeats):
            shift = repeat % len(points)
            for point in points[shift:] + points[:shift]:
                batch, infer, decode = point
                out_dir = work_dir / f"sweep_b{batch}_a{infer}_d{decode}_{repeat}"
                rate = _job_rate(data, server.grpc_url, out_dir, point)
                logger.info("sweep %s repeat %d: %.1f instances/s", point, repeat, rate)
                rates[point].append(rate)

    medians = {point: statistics.median(values) for point, values in rates.items()}
    chosen = choose_point(medians, config.tolerance)
    default = default_point()
    if default in medians:
        reference, reference_name = default, "the job's defaults"
    else:
        reference = min(medians, key=medians.__getitem__)
        reference_name = "the slowest point"

    series = []
    for decode in config.decode_batch_sizes:
        for infer in config.infer_actors:
            series.append(
                Series(
                    _label(infer, decode),
                    [float(batch) for batch in config.batch_sizes],
                    [medians[(batch, infer, decode)] for batch in config.batch_sizes],
                )
            )
    raw: dict[str, Any] = {
        "instances": config.instances,
        "repeats": config.repeats,
        "tolerance": config.tolerance,
        "points": [
            {
                "batch_size": batch,
                "infer_actors": infer,
                "decode_batch_size": decode,
                "instances_per_s": rates[(batch, infer, decode)],
                "median_instances_per_s": medians[(batch, infer, decode)],
            }
            for batch, infer, decode in points
        ],
    }
    return BenchResult(
        name="sweep_pipeline",
        title="Pipeline throughput against batch size and actor counts",
        command=config.command,
        ratios=[
            Ratio(
                name="sweep_pipeline_chosen",
                value=medians[chosen] / medians[reference],
                numerator=medians[chosen],
                denominator=medians[reference],
                unit="instances/s",
                description=(
                    f"chosen point (batch {chosen[0]}, {_label(*chosen[1:])}) over "
                    f"{reference_name} (batch {reference[0]}, "
                    f"{_label(*reference[1:])}), median of {config.repeats}"
                ),
            )
        ],
        plots=[
            Plot(
                name="throughput",
                title="pipeline throughput vs batch size",
                x_label="batch size (frames per Triton request)",
                y_label="instances/s",
                series=series,
                log_x=True,
            )
        ],
        raw=raw,
        chosen={
            "batch_size": chosen[0],
            "infer_actors": chosen[1],
            "decode_batch_size": chosen[2],
        },
        notes=[
            "Chosen: the highest median instances/s, or among points within "
            f"{config.tolerance:.0%} of it the smallest batch size, then the fewest "
            "actors, then the smallest decode batch.",
            "Each job's time includes its header pass and Ray Data start-up.",
            "The job caps a request at the model's max_batch_size (32 for the "
            "exported cxr_resnet), so larger batch sizes send at most 32 frames.",
        ],
    )
