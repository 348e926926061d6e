"""The real-time benchmark's multimodal designs on the exported test repository."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from clinfer.bench.realtime import DESIGNS, run_bench, tiny_config, write_repository
from clinfer.export.multimodal import ExportReport
from clinfer.export.repository import REALTIME_MODEL_PARAMETER


def test_priority_design_has_no_copies(mm_export: ExportReport, tmp_path: Path) -> None:
    root = write_repository(
        tmp_path / "repo", DESIGNS["multimodal_priority"], mm_export.repository
    )
    config = (root / "multimodal" / "config.pbtxt").read_text()
    assert (root / "cxr_cnn" / "config.pbtxt").is_file()
    assert not (root / "multimodal_realtime").exists()
    assert REALTIME_MODEL_PARAMETER not in config


def test_realtime_design_has_copies(mm_export: ExportReport, tmp_path: Path) -> None:
    root = write_repository(
        tmp_path / "repo", DESIGNS["multimodal_realtime"], mm_export.repository
    )
    for name in ("cxr_cnn", "emr_mlp", "fusion", "multimodal"):
        assert (root / f"{name}_realtime" / "config.pbtxt").is_file(), name


def test_tiny_multimodal_bench_runs(mm_export: ExportReport, tmp_path: Path) -> None:
    config = replace(
        tiny_config(("multimodal_realtime",)),
        multimodal_repository=mm_export.repository,
    )
    out = tmp_path / "realtime.json"
    summaries = run_bench(config, out)
    data = json.loads(out.read_text())
    assert data["results"] == summaries
    assert summaries[0]["design"] == "multimodal_realtime"
    assert summaries[0]["errors"] == 0
    assert summaries[0]["realtime_samples"] == [3, 3]
    assert summaries[0]["batch_kept_ratio"] is not None
