"""The reusable request latency histogram of the real-time path."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from clinfer.errors import ConfigurationError
from clinfer.metrics import RequestLatency, gateway_latency

NAME = "clinfer_gateway_request_seconds"


def _count(
    registry: CollectorRegistry, route: str, priority: str, outcome: str
) -> float:
    labels = {"route": route, "priority": priority, "outcome": outcome}
    return registry.get_sample_value(f"{NAME}_count", labels) or 0.0


def test_known_route_and_priority() -> None:
    registry = CollectorRegistry()
    latency = gateway_latency(registry, ["/v1/score"])
    latency.observe("/v1/score", 1, 0.02)
    latency.observe("/v1/score", 2, 0.5)
    assert _count(registry, "/v1/score", "realtime", "ok") == 1
    assert _count(registry, "/v1/score", "batch", "ok") == 1


def test_unknown_values_become_other() -> None:
    registry = CollectorRegistry()
    latency = gateway_latency(registry, ["/v1/score"])
    latency.observe("/v1/studies/1.2.840.10008.1", 9, 0.1)
    assert _count(registry, "other", "other", "ok") == 1


def test_exception_recorded_as_error() -> None:
    registry = CollectorRegistry()
    latency = gateway_latency(registry, ["/v1/score"])
    with pytest.raises(RuntimeError), latency.time("/v1/score", 1):
        raise RuntimeError("request failed")
    assert _count(registry, "/v1/score", "realtime", "error") == 1
    assert _count(registry, "/v1/score", "realtime", "ok") == 0


def test_name_without_seconds_rejected() -> None:
    with pytest.raises(ConfigurationError, match="_seconds"):
        RequestLatency("clinfer_latency", "x", routes=[], registry=CollectorRegistry())
