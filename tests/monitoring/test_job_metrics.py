"""Job metrics read from the registry after a real scoring job."""

from __future__ import annotations

import socket
import sqlite3

from clinfer.workers import reasons
from clinfer.workers.pipeline import RESULTS_FILE
from prometheus_client.core import Metric

from .conftest import MeteredJob

MODEL_LABELS = {"model", "version"}
EXPECTED = {
    # name as collected (counters without _total): (type, label names)
    "clinfer_jobs": ("counter", MODEL_LABELS | {"status"}),
    "clinfer_studies_scored": ("counter", MODEL_LABELS),
    "clinfer_instances_scored": ("counter", MODEL_LABELS),
    "clinfer_frames_scored": ("counter", MODEL_LABELS),
    "clinfer_files_rejected": ("counter", MODEL_LABELS | {"outcome", "reason"}),
    "clinfer_decode_seconds": ("histogram", MODEL_LABELS),
    "clinfer_preprocess_seconds": ("histogram", MODEL_LABELS),
    "clinfer_inference_request_seconds": ("histogram", MODEL_LABELS),
    "clinfer_end_to_end_seconds": ("histogram", MODEL_LABELS),
    "clinfer_instances_in_flight": ("gauge", MODEL_LABELS),
    "clinfer_frames_awaiting_instance": ("gauge", MODEL_LABELS),
    "clinfer_gpu_available": ("gauge", set()),
    "clinfer_gpu_utilization_ratio": ("gauge", {"gpu"}),
    "clinfer_gpu_memory_used_bytes": ("gauge", {"gpu"}),
}


def _families(job: MeteredJob) -> dict[str, Metric]:
    return {family.name: family for family in job.metrics.registry.collect()}


def _value(job: MeteredJob, name: str, **labels: str) -> float:
    labels = {
        "model": job.summary.model,
        "version": job.summary.model_version,
        **labels,
    }
    value = job.metrics.registry.get_sample_value(name, labels)
    assert value is not None, f"no sample {name}{labels}"
    return value


def _rows(job: MeteredJob, query: str) -> list[tuple]:
    with sqlite3.connect(job.out_dir / RESULTS_FILE) as db:
        return db.execute(query).fetchall()


def test_metric_types(metered_job: MeteredJob) -> None:
    families = _families(metered_job)
    for name, (kind, _) in EXPECTED.items():
        assert name in families, name
        assert families[name].type == kind, name


def test_metric_label_names(metered_job: MeteredJob) -> None:
    families = _families(metered_job)
    for name, (_, label_names) in EXPECTED.items():
        for sample in families[name].samples:
            assert set(sample.labels) - {"le"} == label_names, sample


def test_label_values_carry_no_ids(metered_job: MeteredJob) -> None:
    uids = {
        uid for (uid,) in _rows(metered_job, "SELECT sop_instance_uid FROM instances")
    }
    studies = {
        s for (s,) in _rows(metered_job, "SELECT study_instance_uid FROM instances")
    }
    paths = {str(p) for p in metered_job.inputs}
    forbidden = uids | studies | paths
    assert uids
    for family in _families(metered_job).values():
        for sample in family.samples:
            for value in sample.labels.values():
                assert value not in forbidden, sample
                assert "/" not in value, sample


def test_instances_scored_matches_job(metered_job: MeteredJob) -> None:
    scored = _value(metered_job, "clinfer_instances_scored_total")
    assert metered_job.summary.instances_scored == len(metered_job.inputs) - 1
    assert scored == metered_job.summary.instances_scored


def test_frames_scored_matches_job(metered_job: MeteredJob) -> None:
    frames = _value(metered_job, "clinfer_frames_scored_total")
    assert frames == metered_job.summary.frames_scored
    assert frames > metered_job.summary.instances_scored  # emri_small has 10 frames


def test_studies_scored_distinct(metered_job: MeteredJob) -> None:
    (count,) = _rows(
        metered_job, "SELECT COUNT(DISTINCT study_instance_uid) FROM instances"
    )[0]
    assert _value(metered_job, "clinfer_studies_scored_total") == count


def test_bad_file_counted_by_reason(metered_job: MeteredJob) -> None:
    value = _value(
        metered_job,
        "clinfer_files_rejected_total",
        outcome=reasons.FAILED,
        reason=reasons.NOT_DICOM,
    )
    assert value == 1


def test_histograms_observed(metered_job: MeteredJob) -> None:
    instances = metered_job.summary.instances_scored
    for name in ("decode", "preprocess", "end_to_end"):
        count = _value(metered_job, f"clinfer_{name}_seconds_count")
        assert count == instances, name
    requests = _value(metered_job, "clinfer_inference_request_seconds_count")
    # batch_size 4 and 12 frames: at least 3 requests, at most one per frame.
    assert requests >= 3
    assert requests <= metered_job.summary.frames_scored
    assert _value(metered_job, "clinfer_inference_request_seconds_sum") > 0


def test_gauges_drained_after_job(metered_job: MeteredJob) -> None:
    assert _value(metered_job, "clinfer_instances_in_flight") == 0
    assert _value(metered_job, "clinfer_frames_awaiting_instance") == 0


def test_job_counted_completed(metered_job: MeteredJob) -> None:
    assert _value(metered_job, "clinfer_jobs_total", status="completed") == 1


def test_endpoint_served_during_job(metered_job: MeteredJob) -> None:
    assert len(metered_job.scraped_during_job) == 1
    text = metered_job.scraped_during_job[0]
    # Scraped at the start of scoring, after the header scan rejected bad.dcm.
    assert 'reason="not_dicom"' in text
    # The job had not finished, so no job was counted yet.
    assert "clinfer_jobs_total{" not in text


def test_endpoint_closed_after_job(metered_job: MeteredJob) -> None:
    with socket.socket() as sock:
        sock.settimeout(2.0)
        assert sock.connect_ex(("127.0.0.1", metered_job.job_port)) != 0
