"""Department-wide retrospective scoring job: files -> Ray Data -> Triton -> SQLite.

Stages:

1. Discover files and drop those that an earlier run already scored or skipped and
   that have not changed since (size and modification time).
2. Read headers without pixel data (plain Ray tasks) and group instances into series and
   studies. Files that are not DICOM, broken, not accepted by the model or duplicates
   of an instance seen before go to the failures table.
3. Decode and preprocess, one row per frame, and send batches of frames to Triton
   over gRPC, in the same pool of Ray actors (input tensors in shared memory when the
   server is on this machine).
4. Collect frames per instance on the driver and write whole instances in
   transactions; then recompute the study rows.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from clinfer.client.triton import ModelSpec, TritonModelClient
from clinfer.export.repository import BATCH_PRIORITY
from clinfer.workers import reasons
from clinfer.workers.discovery import FileEntry, discover_files
from clinfer.workers.results import Failure, InstanceResult, ResultStore
from clinfer.workers.stages import (
    EMR_JOINED,
    EMR_MISSING,
    EMR_NOT_USED,
    ScoreStage,
    scan_headers,
)

from clinfer.errors import (
    ClinferError,
    ConfigurationError,
    ServerError,
    ServerNotReadyError,
)
from clinfer.metrics import (
    JobMetrics,
    JobRecorder,
    MetricsServer,
    NvmlGpuCollector,
    start_metrics_server,
)

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.sqlite"
LOOPBACK_RAY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}


@dataclass
class JobOptions:
    """Settings of one scoring job."""

    paths: Sequence[str]
    out_dir: Path
    triton_urls: Sequence[str]
    model: str
    version: str | None = None
    ray_address: str | None = None
    # Frames per Triton request, capped by the model's max_batch_size. 8 is the
    # operating point that `clinfer bench sweep` and `clinfer bench serving` chose
    # on a 2-core CPU server (docs/bench/report.md): the smallest batch within 5 %
    # of the peak throughput. Rerun them to size a GPU server.
    batch_size: int = 8
    # Ray actors that each decode and preprocess instances and send their frames to
    # Triton (one CPU each).
    infer_actors: int = 2
    # Instances per call of an actor.
    decode_batch_size: int = 32
    header_batch_size: int = 64
    # Pass request tensors to Triton servers on a loopback address in POSIX shared
    # memory instead of in the gRPC message. A client falls back to gRPC when the
    # region cannot be created or registered.
    shared_memory: bool = True
    strict: bool = False
    priority: int = BATCH_PRIORITY
    flush_every: int = 64
    # Object store memory the streaming executor may fill with decoded frames ahead of
    # inference. A fixed budget keeps the job's memory independent of its size.
    object_store_budget_bytes: int = 512 * 2**20
    # EMR rows (CSV as ``clinfer cohort`` writes it) joined to instances by
    # PatientID and AccessionNumber, for models with an EMR input.
    emr_csv: Path | None = None
    # Folder for a DICOM SR per study and a heatmap Secondary Capture per study.
    dicom_out: Path | None = None
    # Prometheus metrics: recorded into ``metrics`` (a new registry by default) and
    # served on metrics_host:metrics_port for the job's duration (0: any free port).
    metrics: JobMetrics | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"


@dataclass
class JobSummary:
    """Counts and timings of one job run, also stored in the ``jobs`` table."""

    job_id: str
    model: str
    model_version: str
    model_sha256: str
    model_training: str = ""
    files_found: int = 0
    files_unchanged: int = 0
    instances_to_score: int = 0
    instances_scored: int = 0
    frames_scored: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    total_instances: int = 0
    total_series: int = 0
    total_studies: int = 0
    dicom_outputs: int = 0
    wall_s: float = 0.0
    status: str = "running"

    @property
    def instances_per_s(self) -> float:
        return self.instances_scored / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def frames_per_s(self) -> float:
        return self.frames_scored / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            instances_per_s=self.instances_per_s, frames_per_s=self.frames_per_s
        )
        return data


ProgressCallback = Callable[[str, int, int], None]


def _keep_ray_on_loopback(address: str | None) -> None:
    """Keep a single-machine Ray cluster's services on 127.0.0.1.

    Ray 2.60 replaces a loopback node address by the machine's first interface
    address unless cluster mode is off (``ray._private.services.get_node_ip_address``).
    The switch is read when ``ray`` is first imported, so this runs before that.
    """
    host = (address or "127.0.0.1").rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost"):
        os.environ.setdefault(LOOPBACK_RAY_ENV, "0")


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        logger.info("using Ray at %s", ray.get_runtime_context().gcs_address)
        return
    ray.init(
        # "local" starts a new cluster even when RAY_ADDRESS or a `ray start` on this
        # machine points at another one.
        address=address or "local",
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # Ray Data logs every dataset execution at INFO; the job logs its own summary.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logger.info("connected to Ray at %s", ray.get_runtime_context().gcs_address)


def run_job(
    options: JobOptions, progress: ProgressCallback | None = None
) -> JobSummary:
    """Run (or resume) a scoring job and return its summary.

    Raises
    ------
    ClinferError
        If the model cannot be reached or inference fails after retries. Results written
        before the failure stay in the store, and a rerun resumes from them.
    """
    _keep_ray_on_loopback(options.ray_address)
    import ray

    started = time.perf_counter()
    if not options.triton_urls:
        raise ConfigurationError("no Triton URL given; pass --triton-url")
    spec = _fetch_spec(options)
    job_id = uuid.uuid4().hex[:12]
    out_dir = Path(options.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = ResultStore(
        out_dir / RESULTS_FILE,
        model_name=spec.name,
        model_version=spec.version,
        model_sha256=spec.sha256,
    )
    summary = JobSummary(
        job_id,
        spec.name,
        spec.version,
        spec.sha256,
        model_training=spec.training_note,
    )
    store.start_job(job_id)
    report = progress or (lambda stage, done, total: None)
    recorder = _job_metrics(options).recorder(spec.name, spec.version)
    metrics_server: MetricsServer | None = None
    logger.info(
        "job %s: model %s:%s (sha256 %s)",
        job_id,
        spec.name,
        spec.version,
        spec.sha256[:12],
    )

    try:
        metrics_server = _serve_metrics(options, recorder.metrics)
        files = discover_files(options.paths)
        summary.files_found = len(files)
        to_scan, unchanged = _split_unchanged(files, store)
        summary.files_unchanged = unchanged
        stats = {f.path: (f.size, f.mtime_ns) for f in files}
        logger.info(
            "job %s: %d files found, %d unchanged since an earlier run, %d to read",
            job_id,
            len(files),
            unchanged,
            len(to_scan),
        )

        _init_ray(options.ray_address)
        alternates: dict[str, list[dict[str, Any]]] = {}
        instances = _scan(
            to_scan, options, spec, store, job_id, stats, report, recorder, alternates
        )
        summary.instances_to_score = len(instances)
        report("score", 0, len(instances))
        while instances:
            failed = _score(
                instances,
                options,
                spec,
                store,
                job_id,
                stats,
                summary,
                report,
                recorder,
            )
            # An instance whose chosen copy failed to decode is tried from its next
            # copy, until one scores or none is left.
            instances = [
                alternates[uid].pop(0) for uid in sorted(failed) if alternates.get(uid)
            ]
            if instances:
                emr_failures = _join_emr(instances, spec, options.emr_csv, job_id)
                store.record_failures(emr_failures, job_id)
                logger.info(
                    "job %s: trying other copies of %d instances that failed",
                    job_id,
                    len(instances),
                )
        if options.dicom_out is not None:
            from clinfer.workers.dicom_outputs import write_study_outputs

            store.update_studies(spec.positive_label, _negative_label(spec))
            summary.dicom_outputs = write_study_outputs(
                store,
                spec,
                options.triton_urls[0],
                Path(options.dicom_out),
                priority=options.priority,
            )
        summary.status = "completed"
    except BaseException as exc:
        summary.status = (
            "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        )
        raise
    finally:
        try:
            summary.total_studies = store.update_studies(
                spec.positive_label, _negative_label(spec)
            )
            summary.total_instances = store.count("instances")
            summary.total_series = store.series_count()
            for (outcome, reason), count in sorted(store.failure_counts().items()):
                target = (
                    summary.failed if outcome == reasons.FAILED else summary.skipped
                )
                target[reason] = count
            summary.wall_s = time.perf_counter() - started
            store.finish_job(job_id, summary.status, summary.as_dict())
        finally:
            store.close()
            recorder.finished(summary.status)
            if metrics_server is not None:
                metrics_server.stop()
    logger.info(
        "job %s: %d instances scored in %.1f s; %d failed, %d skipped",
        job_id,
        summary.instances_scored,
        summary.wall_s,
        sum(summary.failed.values()),
        sum(summary.skipped.values()),
    )
    del ray
    return summary


def _job_metrics(options: JobOptions) -> JobMetrics:
    if options.metrics is not None:
        return options.metrics
    metrics = JobMetrics()
    metrics.registry.register(NvmlGpuCollector())
    return metrics


def _serve_metrics(options: JobOptions, metrics: JobMetrics) -> MetricsServer | None:
    if options.metrics_port is None:
        return None
    # NOTE: the endpoint stops with the job, so a job shorter than the scrape interval
    # may never be scraped; the results database has every count.
    return start_metrics_server(
        metrics.registry, host=options.metrics_host, port=options.metrics_port
    )


def _negative_label(spec: ModelSpec) -> str:
    others = [label for label in spec.labels if label != spec.positive_label]
    return others[0] if others else "negative"


def _fetch_spec(options: JobOptions) -> ModelSpec:
    """Read the model spec from every server; drop servers that cannot be reached.

    Raises
    ------
    ServerError
        If no server can be reached.
    ModelSpecError
        If a reachable server lacks the model.
    ConfigurationError
        If the servers serve different versions of the model.
    """
    specs: list[tuple[str, ModelSpec]] = []
    for url in options.triton_urls:
        client = TritonModelClient(url, options.model, options.version)
        try:
            client.wait_ready(timeout_s=30.0)
            specs.append((url, client.fetch_spec()))
        except ServerNotReadyError as exc:
            if len(options.triton_urls) == 1:
                raise
            logger.warning("leaving out Triton at %s: %s", url, exc)
        finally:
            client.close()
    if not specs:
        raise ServerError(
            "none of the Triton servers given with --triton-url can be reached; "
            "start one with `clinfer serve` or check the addresses."
        )
    first_url, first = specs[0]
    for url, other in specs[1:]:
        if (other.version, other.sha256) != (first.version, first.sha256):
            raise ConfigurationError(
                f"Triton at {url} serves {other.name}:{other.version} (sha256 "
                f"{other.sha256[:12]}) but {first_url} serves version "
                f"{first.version} (sha256 {first.sha256[:12]}); point every --triton-url "
                "at the same model repository or pass --model NAME:VERSION."
            )
    options.triton_urls = [url for url, _ in specs]
    return first


def _split_unchanged(
    files: list[FileEntry], store: ResultStore
) -> tuple[list[FileEntry], int]:
    known = store.known_files()
    to_scan = []
    unchanged = 0
    for entry in files:
        previous = known.get(entry.path)
        if (
            previous
            and previous[:2] == (entry.size, entry.mtime_ns)
            and previous[2]
            in (
                "scored",
                "skipped",
            )
        ):
            unchanged += 1
        else:
            to_scan.append(entry)
    return to_scan, unchanged


def _scan(
    to_scan: list[FileEntry],
    options: JobOptions,
    spec: ModelSpec,
    store: ResultStore,
    job_id: str,
    stats: dict[str, tuple[int, int]],
    report: ProgressCallback,
    recorder: JobRecorder,
    alternates: dict[str, list[dict[str, Any]]],
) -> list[dict[str, Any]]:
    """Read headers, record rejected files and return the instances to score.

    Other copies of an instance found in the same run are added to ``alternates``,
    so that one is scored if the chosen copy cannot be decoded.
    """

    report("scan", 0, len(to_scan))
    if not to_scan:
        return []
    headers = sorted(
        _read_headers([f.path for f in to_scan], options, spec),
        key=lambda row: str(row["path"]),
    )
    report("scan", len(to_scan), len(to_scan))

    scored_paths = store.scored_paths()
    previous_uids = store.file_uids()
    seen: dict[str, str] = {}
    failures: list[Failure] = []
    file_rows: list[tuple[str, int, int, str, str | None]] = []
    instances: list[dict[str, Any]] = []
    for row in headers:
        path = str(row["path"])
        uid = str(row["sop_instance_uid"]) or None
        reason = str(row["reason"])
        message = str(row["message"])
        previous_uid = previous_uids.get(path)
        if (
            previous_uid
            and previous_uid != uid
            and scored_paths.get(previous_uid) == path
        ):
            # The file now contains another instance, so its old result no longer has
            # a source file.
            store.delete_instance(previous_uid)
            del scored_paths[previous_uid]
        if (
            reason == reasons.NOT_DICOM
            and Path(path).suffix.lower() not in DICOM_SUFFIXES
            and Path(path).suffix
        ):
            # A non-DICOM file with another suffix (README.txt, a .json sidecar) is
            # skipped; one that claims to be DICOM by its name has failed.
            reason = reasons.NON_DICOM_FILE
        if not reason and uid in scored_paths:
            scored_path = scored_paths[uid]
            if scored_path == path:
                file_rows.append((path, *stats[path], "scored", uid))
                continue
            if not Path(scored_path).exists():
                # The scored file was moved or renamed: its result follows it.
                store.move_instance(uid, path)
                scored_paths[uid] = path
                file_rows.append((path, *stats[path], "scored", uid))
                continue
            reason = reasons.DUPLICATE_INSTANCE
            message = (
                f"{path}: SOPInstanceUID is the same as in {scored_path}, which was "
                "scored before; results are keyed on SOPInstanceUID, so one copy of "
                "an instance is scored."
            )
        elif not reason and uid in seen:
            reason = reasons.DUPLICATE_INSTANCE
            message = (
                f"{path}: SOPInstanceUID is the same as in {seen[uid]}; results are "
                "keyed on SOPInstanceUID, so one copy of an instance is scored, and "
                "this copy is scored only if that one cannot be decoded."
            )
            alternates.setdefault(uid, []).append(_instance_row(path, uid, row))
        if reason:
            outcome = reasons.outcome_of(reason)
            failures.append(Failure(path, outcome, reason, message, uid))
            if reason == reasons.DUPLICATE_INSTANCE:
                # Read again on every run: the copy that was scored may fail or go.
                status = "duplicate"
            else:
                status = "skipped" if outcome == reasons.SKIPPED else "failed"
            file_rows.append((path, *stats[path], status, uid))
            continue
        seen[uid] = path
        instances.append(_instance_row(path, uid, row))
    failures.extend(_join_emr(instances, spec, options.emr_csv, job_id))
    store.record_failures(failures, job_id)
    store.record_files(file_rows)
    recorder.rejected(failures, in_flight=False)
    studies = {i["study_instance_uid"] for i in instances}
    series = {i["series_instance_uid"] for i in instances}
    logger.info(
        "job %s: %d instances in %d series and %d studies to score; %d files rejected",
        job_id,
        len(instances),
        len(series),
        len(studies),
        len(failures),
    )
    return instances


def _read_headers(
    paths: list[str], options: JobOptions, spec: ModelSpec
) -> list[dict[str, Any]]:
    """Read the headers of ``paths`` in Ray tasks of ``header_batch_size`` files.

    Plain tasks replace a Ray Data pipeline because the rows are small and a dataset's
    execution start-up took longer than the reading itself: 1.6 s against 0.7 s for
    2000 copies of MR_small.dcm on a 2-core machine. At most four tasks per CPU are in
    flight.
    """
    import ray

    scan = ray.remote(num_cpus=1)(scan_headers)
    size = max(1, options.header_batch_size)
    chunks = [np.array(paths[i : i + size]) for i in range(0, len(paths), size)]
    limit = max(1, 4 * int(ray.cluster_resources().get("CPU", 1)))
    rows: list[dict[str, Any]] = []
    in_flight: list[Any] = []
    for index in range(len(chunks) + 1):
        if index < len(chunks):
            in_flight.append(
                scan.remote(
                    {"path": chunks[index]},
                    strict=options.strict,
                    accepts=spec.accepts,
                )
            )
            if len(in_flight) < limit:
                continue
        while in_flight and (len(in_flight) >= limit or index == len(chunks)):
            done, in_flight = ray.wait(in_flight, num_returns=1)
            batch = ray.get(done[0])
            keys = list(batch)
            rows.extend(
                {key: batch[key][i] for key in keys} for i in range(len(batch["path"]))
            )
    return rows


def _instance_row(path: str, uid: str, row: dict[str, Any]) -> dict[str, Any]:
    return {
        "path": path,
        "sop_instance_uid": uid,
        "study_instance_uid": str(row["study_instance_uid"]),
        "series_instance_uid": str(row["series_instance_uid"]),
        "modality": str(row["modality"]),
        "number_of_frames": int(row["number_of_frames"]),
        "patient_id": str(row["patient_id"]),
        "accession_number": str(row["accession_number"]),
    }


def _join_emr(
    instances: list[dict[str, Any]], spec: ModelSpec, emr_csv: Path | None, job_id: str
) -> list[Failure]:
    """Attach EMR features to each instance by (PatientID, AccessionNumber).

    An instance without an EMR row is scored by the image model alone and stored
    with ``emr_status = "missing"``. An instance whose EMR row has an invalid value
    is removed from ``instances`` and returned as an ``invalid_emr`` failure naming
    the line, column and value; failed files are read again by the next run, so
    correcting the row and rerunning scores it.

    Raises
    ------
    ConfigurationError
        If the model takes an EMR input and no EMR file is given, or the file is
        invalid.
    """
    if not spec.emr_input:
        for instance in instances:
            instance["emr_status"] = EMR_NOT_USED
        return []
    if emr_csv is None:
        raise ConfigurationError(
            f"model {spec.name} takes an EMR input; pass --emr FILE (a CSV as "
            "`clinfer cohort` writes it), or score with an image-only model."
        )
    from clinfer.train.emr import emr_features, read_emr_csv

    invalid: dict[tuple[str, str], str] = {}
    try:
        records = read_emr_csv(Path(emr_csv), invalid=invalid)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read the EMR file {emr_csv}: {exc}") from exc
    joined = 0
    failures = []
    to_score = []
    for instance in instances:
        key = (instance["patient_id"], instance["accession_number"])
        if key in invalid:
            failures.append(
                Failure(
                    instance["path"],
                    reasons.FAILED,
                    reasons.INVALID_EMR,
                    f"{instance['path']}: {invalid[key]}; correct the EMR row of this "
                    "study and rerun the job, which retries failed files.",
                    instance["sop_instance_uid"],
                )
            )
            continue
        to_score.append(instance)
        record = records.get(key)
        if record is None:
            instance["emr"] = [0.0] * spec.emr_size
            instance["emr_status"] = EMR_MISSING
            continue
        features = emr_features(record)
        if len(features) != spec.emr_size:
            raise ConfigurationError(
                f"the EMR file {emr_csv} gives {len(features)} features but model "
                f"{spec.name} expects {spec.emr_size}; export the model from the "
                "same clinfer version."
            )
        instance["emr"] = features
        instance["emr_status"] = EMR_JOINED
        joined += 1
    instances[:] = to_score
    logger.info(
        "job %s: EMR rows joined for %d of %d instances; the others are scored by "
        "the image model alone",
        job_id,
        joined,
        len(instances),
    )
    if failures:
        logger.warning(
            "job %s: %d instances not scored because their EMR rows are invalid "
            "(reason invalid_emr in the failures table)",
            job_id,
            len(failures),
        )
    return failures


def _score(
    instances: list[dict[str, Any]],
    options: JobOptions,
    spec: ModelSpec,
    store: ResultStore,
    job_id: str,
    stats: dict[str, tuple[int, int]],
    summary: JobSummary,
    report: ProgressCallback,
    recorder: JobRecorder,
) -> set[str]:
    """Score ``instances`` and return the SOPInstanceUIDs that failed."""
    import ray

    by_uid = {i["sop_instance_uid"]: i for i in instances}
    spec_fields = asdict(spec)
    context = ray.data.DataContext.get_current()
    context.execution_options.resource_limits = ray.data.ExecutionResources(
        object_store_memory=options.object_store_budget_bytes
    )
    items = [
        {"path": i["path"], "sop_instance_uid": i["sop_instance_uid"]}
        for i in instances
    ]
    if spec.emr_input:
        for item, instance in zip(items, instances):
            item["emr"] = instance["emr"]
            item["emr_status"] = instance["emr_status"]
    dataset = ray.data.from_items(
        items,
        override_num_blocks=max(
            1, min(len(instances) // options.decode_batch_size, 200)
        ),
    )
    dataset = dataset.map_batches(
        ScoreStage,
        batch_size=options.decode_batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={
            "height": spec.height,
            "width": spec.width,
            "strict": options.strict,
            "urls": list(options.triton_urls),
            "spec": spec_fields,
            "priority": options.priority,
            "request_size": _request_size(options, spec),
            "shared_memory": options.shared_memory,
        },
        compute=ray.data.ActorPoolStrategy(size=max(options.infer_actors, 1)),
        num_cpus=1,
    )

    pending: dict[str, list[FrameResult]] = defaultdict(list)
    ready: list[InstanceResult] = []
    failures: list[Failure] = []
    failed_uids: set[str] = set()
    done = 0
    recorder.handed_over(len(instances))
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        recorder.request_completed(batch["request_ms"])
        for i in range(len(batch["path"])):
            uid = str(batch["sop_instance_uid"][i])
            if not bool(batch["ok"][i]):
                failed_uids.add(uid)
                reason = str(batch["reason"][i])
                failures.append(
                    Failure(
                        str(batch["path"][i]),
                        reasons.outcome_of(reason),
                        reason,
                        str(batch["message"][i]),
                        uid,
                    )
                )
                done += 1
                continue
            frames = pending[uid]
            frames.append(
                FrameResult(
                    index=int(batch["frame_index"][i]),
                    probabilities=batch["scores"][i],
                    image_probabilities=batch["image_scores"][i],
                    emr_probabilities=batch["emr_scores"][i],
                    decode_ms=float(batch["decode_ms"][i]),
                    preprocess_ms=float(batch["preprocess_ms"][i]),
                    infer_ms=float(batch["infer_ms"][i]),
                    settings=str(batch["settings"][i]),
                )
            )
            if len(frames) == int(batch["num_frames"][i]):
                ready.append(_instance_result(by_uid[uid], pending.pop(uid), spec))
                summary.frames_scored += len(frames)
                done += 1
        recorder.frames_waiting(sum(len(frames) for frames in pending.values()))
        if len(ready) + len(failures) >= options.flush_every:
            summary.instances_scored += _flush(
                store, ready, failures, job_id, stats, recorder
            )
            report("score", done, len(instances))
    summary.instances_scored += _flush(store, ready, failures, job_id, stats, recorder)
    report("score", done, len(instances))
    if pending:
        raise ClinferError(
            f"{len(pending)} instances lost frames between decoding and inference; "
            "rerun the job to score them."
        )
    return failed_uids


def _request_size(options: JobOptions, spec: ModelSpec) -> int:
    """Return the frames per Triton request: the batch size, capped by the model's."""
    if spec.max_batch_size > 0:
        return max(1, min(options.batch_size, spec.max_batch_size))
    return max(1, options.batch_size)


def _flush(
    store: ResultStore,
    ready: list[InstanceResult],
    failures: list[Failure],
    job_id: str,
    stats: dict[str, tuple[int, int]],
    recorder: JobRecorder,
) -> int:
    inserted = store.write_instances(ready, job_id, stats) if ready else 0
    recorder.stored(ready, inserted)
    if failures:
        store.record_failures(failures, job_id)
        store.record_files(
            [(f.path, *stats[f.path], "failed", f.sop_instance_uid) for f in failures]
        )
    recorder.rejected(failures, in_flight=True)
    ready.clear()
    failures.clear()
    return inserted


@dataclass
class FrameResult:
    """The model outputs and timings of one frame, as collected on the driver."""

    index: int
    probabilities: np.ndarray
    image_probabilities: np.ndarray
    emr_probabilities: np.ndarray
    decode_ms: float
    preprocess_ms: float
    infer_ms: float
    settings: str


def _instance_result(
    instance: dict[str, Any], frames: list[FrameResult], spec: ModelSpec
) -> InstanceResult:
    import json

    frames.sort(key=lambda frame: frame.index)
    probabilities = np.stack([frame.probabilities for frame in frames])
    positive = probabilities[:, spec.positive_index]
    best = int(np.argmax(positive))
    score = float(positive[best])
    label = spec.positive_label if score >= spec.threshold else _negative_label(spec)
    outputs: dict[str, float] = {}
    for key, values in (
        ("image_score", frames[best].image_probabilities),
        ("emr_score", frames[best].emr_probabilities),
    ):
        if not np.isnan(values[spec.positive_index]):
            outputs[key] = float(values[spec.positive_index])
    return InstanceResult(
        sop_instance_uid=instance["sop_instance_uid"],
        study_instance_uid=instance["study_instance_uid"],
        series_instance_uid=instance["series_instance_uid"],
        path=instance["path"],
        modality=instance["modality"],
        num_frames=len(frames),
        label=label,
        score=score,
        scores={name: float(v) for name, v in zip(spec.labels, probabilities[best])},
        frame_scores=[float(v) for v in positive],
        threshold=spec.threshold,
        decode_ms=sum(frame.decode_ms for frame in frames),
        preprocess_ms=sum(frame.preprocess_ms for frame in frames),
        infer_ms=sum(frame.infer_ms for frame in frames),
        preprocessing=json.loads(frames[0].settings),
        emr_status=instance.get("emr_status", EMR_NOT_USED),
        outputs=outputs,
    )
