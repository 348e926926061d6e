"""Real Prometheus scraping a real embedded Triton and a finished scoring job."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from clinfer.monitoring.prometheus import PrometheusServer

from .conftest import MeteredJob

WAIT_S = 60.0


def _wait_for(prometheus: PrometheusServer, expression: str) -> list[dict]:
    """Query until the expression returns samples or ``WAIT_S`` passes."""
    deadline = time.monotonic() + WAIT_S
    result = prometheus.query(expression)
    while not result and time.monotonic() < deadline:
        time.sleep(0.5)
        result = prometheus.query(expression)
    return result


def _scalar(result: list[dict]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def test_instances_scored_scraped(
    prometheus: PrometheusServer, metered_job: MeteredJob
) -> None:
    result = _wait_for(prometheus, 'clinfer_instances_scored_total{job="clinfer_job"}')
    assert _scalar(result) == metered_job.summary.instances_scored


def test_rejected_reason_scraped(
    prometheus: PrometheusServer, metered_job: MeteredJob
) -> None:
    result = _wait_for(
        prometheus, 'clinfer_files_rejected_total{outcome="failed",reason="not_dicom"}'
    )
    assert _scalar(result) == 1


def test_triton_requests_scraped(prometheus: PrometheusServer) -> None:
    result = _wait_for(
        prometheus, 'nv_inference_request_success{job="triton",model="cxr_resnet"}'
    )
    assert _scalar(result) > 0


def test_histogram_counts_scraped(
    prometheus: PrometheusServer, metered_job: MeteredJob
) -> None:
    for name in ("inference_request", "end_to_end", "preprocess", "decode"):
        result = _wait_for(prometheus, f"clinfer_{name}_seconds_count")
        assert _scalar(result) > 0, name


def test_latency_quantile_computable(prometheus: PrometheusServer) -> None:
    _wait_for(prometheus, "clinfer_inference_request_seconds_count")
    result = prometheus.query(
        "histogram_quantile(0.9, sum by (le) (clinfer_inference_request_seconds_bucket))"
    )
    assert _scalar(result) > 0


def test_gpu_utilisation_absent(prometheus: PrometheusServer) -> None:
    # Wait for a scrape of both targets, so that an absent series means absent.
    available = _wait_for(prometheus, 'clinfer_gpu_available{job="clinfer_job"}')
    _wait_for(prometheus, 'nv_inference_request_success{job="triton"}')
    assert _scalar(available) == 0
    assert prometheus.query("clinfer_gpu_utilization_ratio") == []
    assert prometheus.query("clinfer_gpu_memory_used_bytes") == []
    assert prometheus.query("nv_gpu_utilization") == []


def test_targets_healthy(prometheus: PrometheusServer) -> None:
    _wait_for(prometheus, 'up{job="clinfer_job"}')
    _wait_for(prometheus, 'up{job="triton"}')
    for job in ("triton", "clinfer_job"):
        assert _scalar(prometheus.query(f'up{{job="{job}"}}')) == 1, job


def test_relative_workdir_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    server = PrometheusServer(Path("results/monitoring/prometheus"), [], port=0)
    server.start()
    try:
        running = server.process is not None and server.process.poll() is None
    finally:
        server.stop()
    assert running
