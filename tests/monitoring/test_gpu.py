"""GPU metrics from NVML: present with a GPU, absent (not 0) without one."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from clinfer.metrics import NvmlGpuCollector


def _has_nvidia_device() -> bool:
    return Path("/dev/nvidiactl").exists() and any(Path("/dev").glob("nvidia[0-9]*"))


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(NvmlGpuCollector())
    return registry


def test_gpu_metrics_match_machine() -> None:
    registry = _registry()
    available = registry.get_sample_value("clinfer_gpu_available")
    utilization = registry.get_sample_value(
        "clinfer_gpu_utilization_ratio", {"gpu": "0"}
    )
    memory = registry.get_sample_value("clinfer_gpu_memory_used_bytes", {"gpu": "0"})
    if _has_nvidia_device():
        assert available == 1
        assert utilization is not None
        assert memory is not None
    else:
        assert available == 0
        assert utilization is None
        assert memory is None


def test_gpu_families_always_described() -> None:
    names = {family.name for family in _registry().collect()}
    assert "clinfer_gpu_utilization_ratio" in names
    assert "clinfer_gpu_memory_used_bytes" in names
