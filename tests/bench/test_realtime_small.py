"""The real-time benchmark in its tiny mode: it runs and writes its JSON."""

from __future__ import annotations

import json
from pathlib import Path

from clinfer.bench.realtime import DESIGNS, run_bench, tiny_config, write_repository


def test_tiny_bench_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "realtime.json"
    summaries = run_bench(tiny_config(("realtime_model",)), out)
    data = json.loads(out.read_text())
    assert data["results"] == summaries
    assert data["results"][0]["design"] == "realtime_model"
    assert data["results"][0]["errors"] == 0
    assert data["results"][0]["batch_kept_ratio"] is not None


def test_realtime_design_has_two_models(tmp_path: Path, model_repository: Path) -> None:
    root = write_repository(
        tmp_path / "repo", DESIGNS["realtime_model"], model_repository
    )
    assert (root / "cxr_resnet" / "config.pbtxt").is_file()
    assert (
        'name: "cxr_resnet_realtime"'
        in (root / "cxr_resnet_realtime" / "config.pbtxt").read_text()
    )
