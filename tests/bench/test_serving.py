"""The serving benchmark in its small mode, against a real server and perf_analyzer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest
from clinfer.bench.gpu import EXIT_UNAVAILABLE, missing_requirements, tensorrt_config
from clinfer.bench.schema import BenchResult
from clinfer.bench.serving import (
    Measurement,
    ServingConfig,
    perf_analyzer_env,
    run,
    smallest_within_peak,
)
from clinfer.export.cxr import cxr_spec
from clinfer.export.repository import TritonConfigOptions
from clinfer.workers.pipeline import JobOptions


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> BenchResult:
    return run(ServingConfig.small(), tmp_path_factory.mktemp("serving"))


def _point(images_per_s: float) -> Measurement:
    return Measurement(images_per_s, 1.0, 2.0, 3.0, 4)


@pytest.mark.parametrize("name", ["p2a", "p2b", "p2a_shm", "shm_gain"])
def test_ratio_positive(result: BenchResult, name: str) -> None:
    ratios = {ratio.name: ratio for ratio in result.ratios}
    assert name in ratios
    assert ratios[name].value > 0
    assert ratios[name].numerator > 0
    assert ratios[name].denominator > 0


@pytest.mark.parametrize("name", ["p2a", "p2b"])
def test_p2_ratio_target(result: BenchResult, name: str) -> None:
    ratios = {ratio.name: ratio for ratio in result.ratios}
    assert ratios[name].target == 0.95


def test_result_name(result: BenchResult) -> None:
    assert result.name == "p2"


def test_plots_non_empty(result: BenchResult) -> None:
    names = [plot.name for plot in result.plots]
    assert names == [
        "p2_paths",
        "serving_throughput_vs_batch",
        "serving_latency_vs_concurrency",
    ]
    for plot in result.plots:
        assert plot.series
        for series in plot.series:
            assert len(series.x) == len(series.y)
            assert series.y
            assert all(value > 0 for value in series.y)


def test_sweep_covers_points(result: BenchResult) -> None:
    config = ServingConfig.small()
    assert sorted(int(k) for k in result.raw["sweep_batch"]) == list(
        config.sweep_batch_sizes
    )
    assert sorted(int(k) for k in result.raw["sweep_concurrency"]) == list(
        config.sweep_concurrency
    )


def test_perf_analyzer_repeats(result: BenchResult) -> None:
    runs = result.raw["p2_runs"]["perf_analyzer"]
    assert len(runs) == ServingConfig.small().repeats
    assert all(run["images_per_s"] > 0 for run in runs)


def test_chosen_from_sweep(result: BenchResult) -> None:
    assert result.chosen["batch_size"] in ServingConfig.small().sweep_batch_sizes
    assert result.chosen["concurrency"] in ServingConfig.small().sweep_concurrency
    default = {f.name: f.default for f in fields(JobOptions)}["batch_size"]
    assert result.chosen["workers_default_batch_size"] == default


def test_result_is_json(result: BenchResult) -> None:
    data = json.loads(json.dumps(result.to_json()))
    assert data["command"] == "clinfer bench serving"


def test_smallest_within_peak() -> None:
    points = {1: _point(50.0), 8: _point(96.0), 32: _point(100.0)}
    assert smallest_within_peak(points, 0.05) == (8, 100.0)


def test_smallest_within_peak_strict() -> None:
    points = {1: _point(50.0), 8: _point(94.0), 32: _point(100.0)}
    assert smallest_within_peak(points, 0.05) == (32, 100.0)


def test_perf_analyzer_env_keeps_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/example/lib")
    paths = perf_analyzer_env()["LD_LIBRARY_PATH"].split(os.pathsep)
    assert Path(paths[0], "libcudart.so.12").is_file()
    assert paths[1] == "/opt/example/lib"


NO_GPU = pytest.mark.skipif(
    shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA driver"
)


@NO_GPU
def test_gpu_script_without_gpu(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    completed = subprocess.run(
        [str(root / "bench" / "gpu_variant.sh"), str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == EXIT_UNAVAILABLE
    assert "GPU variant not run" in completed.stderr
    assert "nvidia-smi is not on PATH" in completed.stderr
    assert not (tmp_path / "gpu_variant.json").exists()


def test_gpu_missing_backends(tmp_path: Path) -> None:
    missing = missing_requirements(tmp_path)
    assert any(str(tmp_path) in line and "tensorrt" in line for line in missing)


def test_tensorrt_config_platform() -> None:
    text = tensorrt_config(cxr_spec(0), TritonConfigOptions())
    assert 'platform: "tensorrt_plan"' in text
    assert "max_batch_size: 32" in text
    assert "KIND_GPU" in text
