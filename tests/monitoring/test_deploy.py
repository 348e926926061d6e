"""docker-compose.yml, Dockerfile and deploy/ checked without a Docker engine."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from prometheus_client import CollectorRegistry

from clinfer.gateway.cli import DEFAULT_PORT as GATEWAY_PORT
from clinfer.metrics import (
    DEFAULT_JOB_METRICS_PORT,
    GatewayMetrics,
    JobMetrics,
    NvmlGpuCollector,
    client_query_metrics,
)
from clinfer.monitoring.prometheus import (
    DEFAULT_PROMETHEUS_PORT,
    ScrapeTarget,
    find_prometheus,
    render_config,
)
from clinfer.monitoring.stack import GATEWAY_JOB
from clinfer.server import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_PORT,
    EmbeddedTritonServer,
)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "clinfer.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
# Host folders that a deployment creates or chooses: the DICOM input and the results.
RUNTIME_PATHS = {
    "${CLINFER_DATA:-./data}",
    "./results",
    "${CLINFER_GATEWAY_TOKENS:-./gateway-tokens.json}",
}
# Triton exports these only with GPUs (--allow-gpu-metrics on a GPU server).
TRITON_GPU_METRICS = {"nv_gpu_utilization", "nv_gpu_memory_used_bytes"}
SERVICES = {
    "triton",
    "ray-head",
    "ray-worker",
    "clinfer-job",
    "gateway",
    "prometheus",
    "grafana",
}


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _services() -> dict[str, Any]:
    return _compose()["services"]


def _promtool() -> str:
    return str(find_prometheus().with_name("promtool"))


def _images() -> list[str]:
    images = [s["image"] for s in _services().values() if "image" in s]
    for service in _services().values():
        base = service.get("build", {}).get("args", {}).get("BASE_IMAGE")
        if base:
            images.append(base)
    images += re.findall(
        r"^ARG BASE_IMAGE=(\S+)", (ROOT / "Dockerfile").read_text(), re.M
    )
    return images


def test_compose_services_present() -> None:
    assert set(_services()) == SERVICES


def test_images_pinned() -> None:
    images = _images()
    assert len(images) >= 7
    for image in images:
        name, sep, tag = image.rpartition(":")
        assert sep and name and "/" not in tag, image
        assert tag != "latest", image


def test_triton_image_matches_client() -> None:
    triton = _services()["triton"]
    # Triton container release 24.10 ships server 2.51, matching tritonclient 2.51.0.
    assert triton["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    assert "--model-config-name=onnxruntime" in triton["command"]


def test_triton_reserves_gpus() -> None:
    devices = _services()["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert "gpu" in devices[0]["capabilities"]


def test_ray_image_matches_ray() -> None:
    base = _services()["ray-head"]["build"]["args"]["BASE_IMAGE"]
    assert base.startswith(f"rayproject/ray:{ray.__version__}-py311")
    assert _services()["ray-worker"]["image"] == _services()["ray-head"]["image"]


def test_triton_ports_match_defaults() -> None:
    triton = _services()["triton"]
    for flag, port in (
        ("--http-port", DEFAULT_HTTP_PORT),
        ("--grpc-port", DEFAULT_GRPC_PORT),
        ("--metrics-port", DEFAULT_METRICS_PORT),
    ):
        assert f"{flag}={port}" in triton["command"], flag
        assert f"127.0.0.1:{port}:{port}" in triton["ports"], flag


def test_prometheus_port_matches_default() -> None:
    service = _services()["prometheus"]
    assert (
        f"127.0.0.1:{DEFAULT_PROMETHEUS_PORT}:{DEFAULT_PROMETHEUS_PORT}"
        in service["ports"]
    )


def test_job_metrics_port_matches_default() -> None:
    command = _services()["clinfer-job"]["command"]
    assert command[command.index("--metrics-port") + 1] == str(DEFAULT_JOB_METRICS_PORT)
    assert f"clinfer-job:{DEFAULT_JOB_METRICS_PORT}" in PROMETHEUS_CONFIG.read_text()


def test_ports_bound_to_loopback() -> None:
    for name, service in _services().items():
        for mapping in service.get("ports", []):
            assert mapping.startswith("127.0.0.1:"), (name, mapping)


def test_mounted_paths_exist() -> None:
    checked = 0
    for name, service in _services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source in RUNTIME_PATHS or not source.startswith("."):
                continue  # named volumes and deployment-chosen folders
            assert (ROOT / source).exists(), (name, source)
            checked += 1
    assert checked >= 5


def test_build_contexts_and_copies_exist() -> None:
    for service in _services().values():
        context = service.get("build", {}).get("context")
        if context:
            assert (ROOT / context / "Dockerfile").is_file(), context
    dockerfile = (ROOT / "Dockerfile").read_text()
    sources = re.findall(r"^COPY (\S+(?: \S+)*) \S+$", dockerfile, re.M)
    assert sources
    for group in sources:
        for source in group.split():
            assert (ROOT / source).exists(), source


def test_prometheus_config_valid() -> None:
    result = subprocess.run(
        [_promtool(), "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_targets_are_services() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    hosts = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            hosts |= {target.rsplit(":", 1)[0] for target in static["targets"]}
        for dns in job.get("dns_sd_configs", []):
            hosts |= set(dns["names"])
    assert hosts == {"triton", "clinfer-job", "gateway", "ray-head", "ray-worker"}


def test_gateway_port_matches_default() -> None:
    service = _services()["gateway"]
    command = service["command"]
    assert command[command.index("--port") + 1] == str(GATEWAY_PORT)
    assert f"127.0.0.1:{GATEWAY_PORT}:{GATEWAY_PORT}" in service["ports"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = jobs[GATEWAY_JOB]["static_configs"][0]["targets"]
    assert targets == [f"gateway:{GATEWAY_PORT}"]


def test_gateway_triton_url_is_service() -> None:
    command = _services()["gateway"]["command"]
    url = command[command.index("--triton-url") + 1]
    assert url == f"triton:{DEFAULT_GRPC_PORT}"


def test_generated_config_valid(tmp_path: Path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text(
        render_config(
            [
                ScrapeTarget("triton", ("127.0.0.1:8002",)),
                ScrapeTarget.parse("g=a:1,b:2"),
            ],
            scrape_interval_s=0.5,
            file_sd_dir=tmp_path,
        )
    )
    result = subprocess.run(
        [_promtool(), "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_datasource_targets_prometheus() -> None:
    text = (PROVISIONING / "datasources" / "prometheus.yml").read_text()
    source = yaml.safe_load(text)["datasources"][0]
    assert source["url"] == f"http://prometheus:{DEFAULT_PROMETHEUS_PORT}"
    assert source["uid"] == "prometheus"


def test_grafana_dashboards_path_mounted() -> None:
    text = (PROVISIONING / "dashboards" / "clinfer.yml").read_text()
    path = yaml.safe_load(text)["providers"][0]["options"]["path"]
    mounts = _services()["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in mounts


def test_dashboard_panels_present() -> None:
    titles = {panel["title"] for panel in json.loads(DASHBOARD.read_text())["panels"]}
    for title in (
        "Throughput",
        "Latency percentiles by priority class",
        "GPU utilisation",
        "Failures by reason",
        "Queue depth",
        "Gateway latency percentiles by priority class",
        "Gateway responses by status code",
    ):
        assert title in titles, title


def _known_clinfer_series() -> set[str]:
    registry = CollectorRegistry()
    JobMetrics(registry)
    GatewayMetrics(registry, [])
    client_query_metrics(registry)
    registry.register(NvmlGpuCollector())
    suffixes = {
        "counter": ["_total"],
        "gauge": [""],
        "histogram": ["_bucket", "_count", "_sum"],
    }
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in suffixes[family.type]
    }


@pytest.fixture(scope="module")
def triton_series(triton_server: EmbeddedTritonServer) -> set[str]:
    with urllib.request.urlopen(triton_server.metrics_url, timeout=10.0) as response:
        text = response.read().decode()
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}


def test_dashboard_metrics_exist(triton_series: set[str]) -> None:
    known = _known_clinfer_series() | triton_series | TRITON_GPU_METRICS
    exprs = [
        target["expr"]
        for panel in json.loads(DASHBOARD.read_text())["panels"]
        for target in panel["targets"]
    ]
    names = {n for e in exprs for n in re.findall(r"\b(?:clinfer|nv)_[a-z_]+", e)}
    assert "nv_inference_pending_request_count" in names
    for name in names:
        assert name in known, name


def test_deployment_doc_present() -> None:
    assert (ROOT / "docs" / "deployment.md").is_file()
