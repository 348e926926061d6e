"""Prometheus metrics of scoring jobs, GPUs and the real-time client path.

Label values come from bounded sets (model name and version, outcome and reason
codes, job status, route templates, priority classes, GPU indexes). They never carry
UIDs, paths or patient data.

:class:`JobMetrics` records what a job's driver process observes. That is the
instances it hands to Ray Data, the frame rows it receives back and the rows it commits
to SQLite. The decode, preprocess and request times in those rows are measured in the
Ray actors. The driver does not see inference requests waiting inside Triton, which
Triton's own ``nv_inference_pending_request_count`` gauge reports.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from clinfer.errors import (
    ConfigurationError,
    DicomInputError,
    EmrInputError,
    ModelSpecError,
    QueryError,
    ServerUnavailableError,
)

logger = logging.getLogger(__name__)

# Port of a scoring job's metrics endpoint, and of the endpoint `clinfer up` serves
# (GPU and process metrics). Triton's own metrics are on clinfer.server's port 8002.
DEFAULT_JOB_METRICS_PORT = 9401
DEFAULT_WORKER_METRICS_PORT = 9400

# Latency buckets in seconds, from 1 ms (one small frame) to 2 min (a large study).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
# End-to-end times of a batch job grow with its size, so their buckets reach 1 h.
END_TO_END_BUCKETS = (*LATENCY_BUCKETS, 300.0, 600.0, 1800.0, 3600.0)

# Priority levels of clinfer models (clinfer.export.repository) by class name.
PRIORITY_CLASSES = {1: "realtime", 2: "batch"}
OTHER = "other"


class _StoredInstance(Protocol):
    study_instance_uid: str
    num_frames: int
    decode_ms: float
    preprocess_ms: float


class _RejectedFile(Protocol):
    outcome: str
    reason: str


class JobMetrics:
    """Metrics of scoring jobs, in their own registry.

    Parameters
    ----------
    registry : CollectorRegistry, optional
        Registry to register the metrics in; a new one by default. Tests pass a fresh
        registry each, because a metric name can be registered only once per registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = ["model", "version"]
        self.jobs = Counter(
            "clinfer_jobs_total",
            "Scoring jobs finished, by final status (completed, failed, interrupted).",
            [*labels, "status"],
            registry=self.registry,
        )
        self.studies_scored = Counter(
            "clinfer_studies_scored_total",
            "Studies of which a job stored at least one instance, counted once per job.",
            labels,
            registry=self.registry,
        )
        self.instances_scored = Counter(
            "clinfer_instances_scored_total",
            "Instances scored and committed to the results database.",
            labels,
            registry=self.registry,
        )
        self.frames_scored = Counter(
            "clinfer_frames_scored_total",
            "Frames (model inputs) of the instances committed to the results database.",
            labels,
            registry=self.registry,
        )
        self.files_rejected = Counter(
            "clinfer_files_rejected_total",
            "Files not scored, by outcome (failed or skipped) and reason code.",
            [*labels, "outcome", "reason"],
            registry=self.registry,
        )
        self.decode_seconds = Histogram(
            "clinfer_decode_seconds",
            "Time to read and decode the pixel data of one instance, all frames.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.preprocess_seconds = Histogram(
            "clinfer_preprocess_seconds",
            "Time to apply the LUTs, scale and resize the frames of one instance.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference_request_seconds = Histogram(
            "clinfer_inference_request_seconds",
            "Round trip of one inference request to Triton, from the first attempt to "
            "the successful response (retries and their back-off included).",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.end_to_end_seconds = Histogram(
            "clinfer_end_to_end_seconds",
            "Time from the job handing an instance to Ray Data until the instance is "
            "committed to the results database. Every instance of a job is handed "
            "over at the start of its scoring stage.",
            labels,
            buckets=END_TO_END_BUCKETS,
            registry=self.registry,
        )
        self.instances_in_flight = Gauge(
            "clinfer_instances_in_flight",
            "Queue depth: instances handed to Ray Data and not yet committed or "
            "recorded as failed.",
            labels,
            registry=self.registry,
        )
        self.frames_awaiting_instance = Gauge(
            "clinfer_frames_awaiting_instance",
            "Scored frames held on the driver until the other frames of their "
            "multi-frame instance arrive.",
            labels,
            registry=self.registry,
        )

    def recorder(self, model: str, version: str) -> JobRecorder:
        """Return a recorder with the model labels of one job bound."""
        return JobRecorder(self, model, version)


@dataclass
class JobRecorder:
    """Records the events of one job into :class:`JobMetrics`.

    Not thread-safe: the job's driver thread is its only caller.
    """

    metrics: JobMetrics
    model: str
    version: str
    _handed_over_at: float = field(default=0.0, init=False)
    _studies: set[str] = field(default_factory=set, init=False, repr=False)

    @property
    def _labels(self) -> tuple[str, str]:
        return self.model, self.version

    def handed_over(self, count: int) -> None:
        """Record ``count`` instances handed to Ray Data for decoding and inference."""
        self._handed_over_at = time.perf_counter()
        self.metrics.instances_in_flight.labels(*self._labels).inc(count)

    def request_completed(self, request_ms: Iterable[float]) -> None:
        """Record inference request round trips in milliseconds; NaN means no request."""
        histogram = self.metrics.inference_request_seconds.labels(*self._labels)
        for value in request_ms:
            if not math.isnan(value):
                histogram.observe(value / 1000.0)

    def frames_waiting(self, count: int) -> None:
        """Set the number of frames held for incomplete multi-frame instances."""
        self.metrics.frames_awaiting_instance.labels(*self._labels).set(count)

    def stored(self, instances: Sequence[_StoredInstance], inserted: int) -> None:
        """Record instances committed to the results database.

        ``inserted`` is the number of new rows the store reports, which is what the
        job summary counts; the latency histograms observe every instance given.
        """
        labels = self._labels
        now = time.perf_counter()
        self.metrics.instances_scored.labels(*labels).inc(inserted)
        new_studies = {i.study_instance_uid for i in instances} - self._studies
        self._studies |= new_studies
        self.metrics.studies_scored.labels(*labels).inc(len(new_studies))
        frames = self.metrics.frames_scored.labels(*labels)
        decode = self.metrics.decode_seconds.labels(*labels)
        preprocess = self.metrics.preprocess_seconds.labels(*labels)
        end_to_end = self.metrics.end_to_end_seconds.labels(*labels)
        for instance in instances:
            frames.inc(instance.num_frames)
            decode.observe(instance.decode_ms / 1000.0)
            preprocess.observe(instance.preprocess_ms / 1000.0)
            end_to_end.observe(now - self._handed_over_at)
        self.metrics.instances_in_flight.labels(*labels).dec(len(instances))

    def rejected(self, failures: Iterable[_RejectedFile], *, in_flight: bool) -> None:
        """Record files not scored; ``in_flight`` if they had been handed to Ray Data."""
        count = 0
        for failure in failures:
            self.metrics.files_rejected.labels(
                *self._labels, failure.outcome, _bounded_reason(failure.reason)
            ).inc()
            count += 1
        if in_flight:
            self.metrics.instances_in_flight.labels(*self._labels).dec(count)

    def finished(self, status: str) -> None:
        """Record the end of the job; instances still in flight were not scored."""
        self.metrics.jobs.labels(*self._labels, status).inc()
        self.metrics.instances_in_flight.labels(*self._labels).set(0)
        self.metrics.frames_awaiting_instance.labels(*self._labels).set(0)


def _bounded_reason(reason: str) -> str:
    from clinfer.workers import reasons

    known = reasons.FAILED_REASONS | reasons.SKIPPED_REASONS
    return reason if reason in known else OTHER


class RequestLatency:
    """Latency histogram of client or gateway requests, by route and priority class.

    Parameters
    ----------
    name : str
        Metric name, ending in ``_seconds``.
    description : str
        Help text of the metric.
    routes : Iterable[str]
        Route templates (``/v1/score``, never a URL with ids in it). A route outside
        this set is recorded as ``other``, which keeps the label set bounded.
    registry : CollectorRegistry
        Registry to register the histogram in.
    buckets : Sequence[float]
        Histogram buckets in seconds.

    Raises
    ------
    ConfigurationError
        If ``name`` does not end in ``_seconds``.
    """

    def __init__(
        self,
        name: str,
        description: str,
        *,
        routes: Iterable[str],
        registry: CollectorRegistry,
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        if not name.endswith("_seconds"):
            raise ConfigurationError(
                f"latency metric name {name!r} must end in '_seconds' (Prometheus "
                "naming convention for durations)."
            )
        self.routes = frozenset(routes)
        self.histogram = Histogram(
            name,
            description,
            ["route", "priority", "outcome"],
            buckets=tuple(buckets),
            registry=registry,
        )

    def observe(
        self, route: str, priority: int, seconds: float, *, ok: bool = True
    ) -> None:
        """Record one request of ``seconds`` on ``route`` at Triton priority level."""
        self.histogram.labels(
            route if route in self.routes else OTHER,
            PRIORITY_CLASSES.get(priority, OTHER),
            "ok" if ok else "error",
        ).observe(seconds)

    @contextmanager
    def time(self, route: str, priority: int) -> Iterator[None]:
        """Time the block; an exception leaving it is recorded as an error."""
        start = time.perf_counter()
        ok = False
        try:
            yield
            ok = True
        finally:
            self.observe(route, priority, time.perf_counter() - start, ok=ok)


def gateway_latency(
    registry: CollectorRegistry, routes: Iterable[str]
) -> RequestLatency:
    """Create the real-time gateway's ``clinfer_gateway_request_seconds`` histogram."""
    return RequestLatency(
        "clinfer_gateway_request_seconds",
        "Time to answer one real-time request, from receipt to response.",
        routes=routes,
        registry=registry,
    )


class GatewayMetrics:
    """Request metrics of the gateway: latency by route and priority, status codes.

    Parameters
    ----------
    registry : CollectorRegistry
        Registry to register the metrics in.
    routes : Iterable[str]
        Route templates of the application. Any other path is recorded as ``other``.
    """

    def __init__(self, registry: CollectorRegistry, routes: Iterable[str]) -> None:
        self.latency = gateway_latency(registry, routes)
        self.responses = Counter(
            "clinfer_gateway_responses_total",
            "Responses of the gateway, by route template and HTTP status code.",
            ["route", "code"],
            registry=registry,
        )

    def route_label(self, route: str | None) -> str:
        """Return ``route`` if it is a known template, else ``other``."""
        return route if route in self.latency.routes else OTHER

    def observe(
        self, route: str | None, priority: int, seconds: float, status: int
    ) -> None:
        """Record one response; a status of 500 or above counts as an error."""
        label = self.route_label(route)
        self.latency.observe(label, priority, seconds, ok=status < 500)
        code = str(status) if 100 <= status <= 599 else OTHER
        self.responses.labels(label, code).inc()


# Outcome label values of client queries, by the exception that ended the query.
QUERY_OUTCOMES: tuple[tuple[type[Exception], str], ...] = (
    (DicomInputError, "invalid_input"),
    (EmrInputError, "invalid_input"),
    (ServerUnavailableError, "server_unavailable"),
    (QueryError, "rejected"),
    (ModelSpecError, "model_error"),
)


class ClientQueryMetrics:
    """Latency of real-time client queries (``clinfer_client_query_seconds``).

    Use :func:`client_query_metrics` to get the instance of a registry, since a
    metric name can be registered only once per registry.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.histogram = Histogram(
            "clinfer_client_query_seconds",
            "Time of one real-time query in clinfer.client, from reading the files "
            "to the parsed response, failover to other servers included.",
            ["priority", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def observe(
        self, priority: int, seconds: float, error: BaseException | None = None
    ) -> None:
        """Record one query; ``error`` is the exception that ended it, if any."""
        outcome = "ok" if error is None else "error"
        if error is not None:
            for kind, name in QUERY_OUTCOMES:
                if isinstance(error, kind):
                    outcome = name
                    break
        self.histogram.labels(PRIORITY_CLASSES.get(priority, OTHER), outcome).observe(
            seconds
        )


_client_metrics: weakref.WeakKeyDictionary[CollectorRegistry, ClientQueryMetrics] = (
    weakref.WeakKeyDictionary()
)
_client_metrics_lock = threading.Lock()


def client_query_metrics(registry: CollectorRegistry) -> ClientQueryMetrics:
    """Return the client query metrics of ``registry``, created on first use.

    Several clients may share one registry, and each gets the same histogram.
    """
    with _client_metrics_lock:
        metrics = _client_metrics.get(registry)
        if metrics is None:
            metrics = ClientQueryMetrics(registry)
            _client_metrics[registry] = metrics
        return metrics


class NvmlGpuCollector(Collector):
    """GPU utilisation and memory from NVML, read at every scrape.

    ``clinfer_gpu_available`` is 1 when NVML reports at least one GPU and 0 otherwise.
    Without a GPU (no driver, no NVML library or no device) the utilisation and memory
    metrics have no samples, so a dashboard shows no data instead of 0 % utilisation.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._initialised = False

    def _init(self) -> Any:
        with self._lock:
            if self._initialised:
                return self._nvml
            self._initialised = True
            try:
                import pynvml

                pynvml.nvmlInit()
            except ImportError:
                logger.info("nvidia-ml-py is not installed; GPU metrics are absent")
            except Exception as exc:  # pynvml.NVMLError: no library, driver or GPU
                logger.info("NVML is unavailable (%s); GPU metrics are absent", exc)
            else:
                self._nvml = pynvml
            return self._nvml

    def collect(self) -> Iterator[Metric]:
        """Yield the GPU metrics; called by the registry at every scrape."""
        nvml = self._init()
        utilization = GaugeMetricFamily(
            "clinfer_gpu_utilization_ratio",
            "Fraction of the last sample period in which a kernel ran on the GPU, "
            "from NVML.",
            labels=["gpu"],
        )
        memory = GaugeMetricFamily(
            "clinfer_gpu_memory_used_bytes",
            "GPU memory in use, from NVML.",
            labels=["gpu"],
        )
        count = 0
        if nvml is not None:
            try:
                count = nvml.nvmlDeviceGetCount()
                for index in range(count):
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                    info = nvml.nvmlDeviceGetMemoryInfo(handle)
                    utilization.add_metric([str(index)], rates.gpu / 100.0)
                    memory.add_metric([str(index)], float(info.used))
            except nvml.NVMLError as exc:
                logger.warning("reading GPU metrics from NVML failed: %s", exc)
                count = 0
                utilization.samples.clear()
                memory.samples.clear()
        available = GaugeMetricFamily(
            "clinfer_gpu_available",
            "1 if NVML reports at least one GPU on this host, else 0.",
        )
        available.add_metric([], 1.0 if count > 0 else 0.0)
        yield available
        yield utilization
        yield memory


@dataclass
class MetricsServer:
    """A Prometheus metrics HTTP endpoint running in a daemon thread."""

    host: str
    port: int
    _server: WSGIServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)
        logger.info("metrics endpoint %s stopped", self.url)


def start_metrics_server(
    registry: CollectorRegistry, *, host: str = "127.0.0.1", port: int = 0
) -> MetricsServer:
    """Serve ``registry`` at ``http://HOST:PORT/metrics``; port 0 picks a free port.

    Raises
    ------
    ConfigurationError
        If the address cannot be bound (port in use, or an address that no local interface has).
    """
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {host}:{port}: {exc}; pass another port, or 0 "
            "for any free port."
        ) from exc
    endpoint = MetricsServer(host, int(server.server_port), server, thread)
    logger.info("serving metrics at %s", endpoint.url)
    return endpoint
