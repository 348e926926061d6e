"""A short real scoring job whose metrics stay served, and Prometheus scraping it."""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from clinfer.workers.pipeline import JobOptions, JobSummary, run_job
from prometheus_client import CollectorRegistry

from clinfer.corpus import find_test_file
from clinfer.metrics import (
    JobMetrics,
    MetricsServer,
    NvmlGpuCollector,
    start_metrics_server,
)
from clinfer.monitoring.prometheus import PrometheusServer, ScrapeTarget
from clinfer.server import EmbeddedTritonServer, free_port

CORPUS_FILES = ("CT_small.dcm", "MR_small.dcm", "emri_small.dcm")


@dataclass
class MeteredJob:
    """A finished job, its metrics and what its own endpoint served while it ran."""

    summary: JobSummary
    metrics: JobMetrics
    out_dir: Path
    inputs: list[Path]
    job_port: int
    scraped_during_job: list[str]


@pytest.fixture(scope="session")
def metered_job(
    triton_server: EmbeddedTritonServer,
    local_ray: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> MeteredJob:
    inputs_dir = tmp_path_factory.mktemp("metered_inputs")
    inputs = [
        Path(shutil.copy(find_test_file(name), inputs_dir / name))
        for name in CORPUS_FILES
    ]
    bad = inputs_dir / "bad.dcm"
    bad.write_bytes(b"this is not a DICOM file\n" * 20)
    inputs.append(bad)

    registry = CollectorRegistry()
    metrics = JobMetrics(registry)
    registry.register(NvmlGpuCollector())
    job_port = free_port()
    scraped: list[str] = []

    def scrape_once(stage: str, done: int, total: int) -> None:
        if stage == "score" and not scraped:
            url = f"http://127.0.0.1:{job_port}/metrics"
            with urllib.request.urlopen(url, timeout=10.0) as response:
                scraped.append(response.read().decode())

    out_dir = tmp_path_factory.mktemp("metered_job")
    options = JobOptions(
        paths=[str(inputs_dir)],
        out_dir=out_dir,
        triton_urls=[triton_server.grpc_url],
        model="cxr_resnet",
        batch_size=4,
        metrics=metrics,
        metrics_port=job_port,
    )
    summary = run_job(options, scrape_once)
    return MeteredJob(summary, metrics, out_dir, inputs, job_port, scraped)


@pytest.fixture(scope="session")
def job_endpoint(metered_job: MeteredJob) -> Iterator[MetricsServer]:
    """The finished job's registry, served for Prometheus to scrape."""
    server = start_metrics_server(metered_job.metrics.registry, port=0)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prometheus(
    triton_server: EmbeddedTritonServer,
    job_endpoint: MetricsServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PrometheusServer]:
    triton_address = f"{triton_server.host}:{triton_server.metrics_port}"
    server = PrometheusServer(
        tmp_path_factory.mktemp("prometheus"),
        [
            ScrapeTarget("triton", (triton_address,)),
            ScrapeTarget("clinfer_job", (job_endpoint.address,)),
        ],
        port=0,
        scrape_interval_s=0.5,
    )
    server.start()
    yield server
    server.stop()
