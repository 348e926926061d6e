"""The local monitoring stack: embedded Triton, the gateway, metrics and Prometheus."""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from prometheus_client import CollectorRegistry, ProcessCollector

from clinfer.errors import ServerError
from clinfer.gateway.app import GatewaySettings
from clinfer.gateway.auth import QUERY_SCOPE, hash_token
from clinfer.gateway.cli import DEFAULT_PORT as DEFAULT_GATEWAY_PORT
from clinfer.gateway.serving import GatewayThread
from clinfer.metrics import (
    DEFAULT_JOB_METRICS_PORT,
    DEFAULT_WORKER_METRICS_PORT,
    MetricsServer,
    NvmlGpuCollector,
    start_metrics_server,
)
from clinfer.monitoring.prometheus import (
    DEFAULT_PROMETHEUS_PORT,
    PrometheusServer,
    ScrapeTarget,
)
from clinfer.server import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_PORT,
    EmbeddedTritonServer,
)

logger = logging.getLogger(__name__)

# Scrape job names, also used by deploy/prometheus/prometheus.yml and the dashboard.
TRITON_JOB = "triton"
WORKER_JOB = "clinfer_worker"
SCORING_JOB = "clinfer_job"
GATEWAY_JOB = "clinfer_gateway"
# Written under WORKDIR/gateway when no tokens file is given.
GATEWAY_TOKEN_FILE = "token"
GATEWAY_TOKENS_FILE = "tokens.json"


@dataclass
class MonitoringStack:
    """Embedded Triton, the gateway, the ``clinfer_worker`` endpoint and Prometheus.

    Prometheus scrapes Triton's metrics, the gateway's ``/metrics`` and the worker
    endpoint (GPU metrics from NVML and this process's CPU and memory). It also
    scrapes scoring jobs on ``job_metrics_port``, where a job started with that port
    serves metrics while it runs, every target in ``extra_targets``, and the file_sd
    files in ``WORKDIR/prometheus/targets/``. Ports of 0 are replaced by free ports at start.

    The gateway serves the Triton server's model ``gateway_model`` and keeps its
    audit log and results under ``WORKDIR/gateway``. Without ``gateway_tokens``, a
    random token with the ``query`` scope is written to ``WORKDIR/gateway/token``
    (mode 0600) and its hash to ``tokens.json`` beside it. A ``gateway_port`` of
    None starts no gateway.
    """

    repository: Path
    workdir: Path
    host: str = "127.0.0.1"
    prometheus_port: int = DEFAULT_PROMETHEUS_PORT
    triton_http_port: int = DEFAULT_HTTP_PORT
    triton_grpc_port: int = DEFAULT_GRPC_PORT
    triton_metrics_port: int = DEFAULT_METRICS_PORT
    worker_metrics_port: int = DEFAULT_WORKER_METRICS_PORT
    job_metrics_port: int | None = DEFAULT_JOB_METRICS_PORT
    extra_targets: Sequence[ScrapeTarget] = ()
    scrape_interval_s: float = 5.0
    gateway_port: int | None = DEFAULT_GATEWAY_PORT
    gateway_tokens: Path | None = None
    gateway_model: str = "cxr_resnet"
    validation_dir: Path | None = None
    triton: EmbeddedTritonServer | None = field(default=None, init=False)
    gateway: GatewayThread | None = field(default=None, init=False)
    metrics: MetricsServer | None = field(default=None, init=False)
    prometheus: PrometheusServer | None = field(default=None, init=False)

    def targets(self) -> list[ScrapeTarget]:
        """Return the scrape targets; valid once Triton and the endpoint run."""
        assert self.triton is not None and self.metrics is not None
        targets = [
            ScrapeTarget(TRITON_JOB, (f"{self.host}:{self.triton.metrics_port}",)),
            ScrapeTarget(WORKER_JOB, (self.metrics.address,)),
        ]
        if self.gateway is not None:
            targets.append(ScrapeTarget(GATEWAY_JOB, (self.gateway.address,)))
        if self.job_metrics_port is not None:
            targets.append(
                ScrapeTarget(SCORING_JOB, (f"{self.host}:{self.job_metrics_port}",))
            )
        return [*targets, *self.extra_targets]

    def start(self) -> MonitoringStack:
        """Start Triton, the gateway, the metrics endpoint and Prometheus, in order.

        Raises
        ------
        ClinferError
            If any part fails to start; the parts already started are stopped.
        """
        workdir = Path(self.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.triton = EmbeddedTritonServer(
                self.repository,
                host=self.host,
                http_port=self.triton_http_port,
                grpc_port=self.triton_grpc_port,
                metrics_port=self.triton_metrics_port,
                log_file=workdir / "tritonserver.log",
            ).start()
            if self.gateway_port is not None:
                self.gateway = self._start_gateway(workdir / "gateway")
            registry = CollectorRegistry()
            registry.register(NvmlGpuCollector())
            ProcessCollector(registry=registry)
            self.metrics = start_metrics_server(
                registry, host=self.host, port=self.worker_metrics_port
            )
            self.prometheus = PrometheusServer(
                workdir / "prometheus",
                self.targets(),
                host=self.host,
                port=self.prometheus_port,
                scrape_interval_s=self.scrape_interval_s,
            ).start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_gateway(self, folder: Path) -> GatewayThread:
        assert self.triton is not None
        folder.mkdir(parents=True, exist_ok=True)
        tokens = self.gateway_tokens
        if tokens is None:
            tokens = folder / GATEWAY_TOKENS_FILE
            token = secrets.token_urlsafe(32)
            token_file = folder / GATEWAY_TOKEN_FILE
            token_file.write_text(token + "\n", encoding="utf-8")
            os.chmod(token_file, 0o600)
            entry = {"user": "clinfer-up", "scopes": [QUERY_SCOPE]}
            tokens.write_text(
                json.dumps({hash_token(token): entry}, indent=1), encoding="utf-8"
            )
            logger.info("gateway token written to %s", token_file)
        settings = GatewaySettings(
            triton_urls=[self.triton.grpc_url],
            tokens_file=tokens,
            audit_log=folder / "audit.jsonl",
            model=self.gateway_model,
            validation_dir=self.validation_dir,
            state_dir=folder,
        )
        assert self.gateway_port is not None
        return GatewayThread(settings, host=self.host, port=self.gateway_port).start()

    def check_running(self) -> None:
        """Raise if Triton or Prometheus has exited.

        Raises
        ------
        ServerError
            If a child process exited; the message names its log file.
        """
        for name, server in (
            ("tritonserver", self.triton),
            ("prometheus", self.prometheus),
        ):
            process = server.process if server is not None else None
            if process is None or process.poll() is not None:
                log = server.log_file if server is not None else "(not started)"
                raise ServerError(f"{name} exited; see {log}")
        if self.gateway is not None and not self.gateway.is_running():
            raise ServerError(f"the gateway on {self.gateway.address} stopped")

    def stop(self) -> None:
        """Stop Prometheus, the metrics endpoint, the gateway and Triton, in order."""
        if self.prometheus is not None:
            self.prometheus.stop()
            self.prometheus = None
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        if self.triton is not None:
            self.triton.stop()
            self.triton = None

    def __enter__(self) -> MonitoringStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
