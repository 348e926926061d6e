"""Benchmark report writer, sweep choice rule and ``clinfer bench all --small``."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from clinfer.bench.cli import config_from_options, realtime_result
from clinfer.bench.report import draw_plot, failed_result, summary, write_report
from clinfer.bench.schema import BenchResult, Plot, Ratio, Series
from clinfer.bench.sweep import SweepConfig, choose_point
from PIL import Image
from rich.console import Console

from clinfer.errors import ClinferError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_NAMES = {"realtime", "p1", "p5", "p2", "p4", "sweep_pipeline"}


def _results() -> list[BenchResult]:
    throughput = BenchResult(
        name="p1",
        title="Job against loop",
        command="clinfer bench pipeline --instances 8",
        ratios=[
            Ratio("p1", 0.5, 10.0, 20.0, "instances/s", "job over loop", target=0.95)
        ],
        plots=[
            Plot(
                "throughput",
                "instances/s per repeat",
                "repeat",
                "instances/s",
                [Series("job", [0.0, 1.0], [10.0, 11.0])],
                log_y=True,
                categories=["repeat 1", "repeat 2"],
            )
        ],
    )
    memory = BenchResult(
        name="p5",
        title="Memory",
        command="clinfer bench memory",
        ratios=[
            Ratio(
                "p5",
                1.05,
                105.0,
                100.0,
                "MiB",
                "large over small",
                target=1.1,
                higher_is_better=False,
            )
        ],
    )
    sweep = BenchResult(
        name="sweep_pipeline",
        title="Sweep",
        command="clinfer bench sweep",
        plots=[
            Plot(
                "throughput",
                "pipeline throughput vs batch size",
                "batch size",
                "instances/s",
                [
                    Series("1 actor", [8.0, 16.0, 32.0], [5.0, 6.0, 6.5]),
                    Series("2 actors", [8.0, 16.0, 32.0], [6.0, 7.0, 7.5]),
                ],
                log_x=True,
            )
        ],
        chosen={"batch_size": 16},
    )
    broken = failed_result(
        "p4", "Decoding", "clinfer bench decode", RuntimeError("decoder crashed")
    )
    return [throughput, memory, sweep, broken]


def test_report_json_has_ratios(tmp_path: Path) -> None:
    paths = write_report(_results(), tmp_path)
    data = json.loads(paths.json.read_text())
    by_name = {result["name"]: result for result in data["results"]}
    assert set(by_name) == {"p1", "p5", "sweep_pipeline", "p4"}
    assert by_name["p1"]["ratios"][0]["value"] == 0.5
    assert by_name["p1"]["ratios"][0]["met"] is False
    assert by_name["p5"]["ratios"][0]["met"] is True
    assert by_name["sweep_pipeline"]["chosen"] == {"batch_size": 16}
    assert "decoder crashed" in by_name["p4"]["raw"]["error"]
    assert data["machine"]["cpus"] == os.cpu_count()
    assert "date" in data


def test_report_markdown_table(tmp_path: Path) -> None:
    paths = write_report(_results(), tmp_path)
    text = paths.markdown.read_text()
    assert "| benchmark | ratio | value | target | met |" in text
    assert (
        "| p1 | p1 | 0.5 | ≥ 0.95 | not met | 10 instances/s | 20 instances/s" in text
    )
    assert "| p5 | p5 | 1.05 | ≤ 1.1 | met | 105 MiB | 100 MiB" in text
    assert "| p4 | – | – | – | failed |" in text
    assert "`clinfer bench pipeline --instances 8`" in text


def test_report_links_valid_pngs(tmp_path: Path) -> None:
    paths = write_report(_results(), tmp_path)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", paths.markdown.read_text())
    assert sorted(links) == ["p1_throughput.png", "sweep_pipeline_throughput.png"]
    assert sorted(path.name for path in paths.plots) == sorted(links)
    for link in links:
        data = (tmp_path / link).read_bytes()
        assert data.startswith(PNG_MAGIC)
        with Image.open(tmp_path / link) as image:
            assert image.format == "PNG"


def test_plot_rejects_bad_category(tmp_path: Path) -> None:
    plot = Plot(
        "bars",
        "bars",
        "x",
        "y",
        [Series("a", [0.0, 2.0], [1.0, 2.0])],
        categories=["c"],
    )
    with pytest.raises(ValueError, match="not an index"):
        draw_plot(plot, tmp_path / "bars.png")


def test_summary_lists_ratios() -> None:
    console = Console(record=True, width=160)
    console.print(summary(_results()))
    text = console.export_text()
    assert "not met" in text
    assert "failed" in text
    assert "sweep_pipeline chosen: batch_size 16" in text


def test_realtime_result_ratios() -> None:
    item = {
        "design": "priority",
        "idle_p50_ms": 5.0,
        "idle_p99_ms": 10.0,
        "loaded_p50_ms": 8.0,
        "loaded_p99_ms": 30.0,
        "p99_ratio": 3.0,
        "batch_alone_fps": 100.0,
        "batch_loaded_fps": 80.0,
        "batch_kept_ratio": 0.8,
        "errors": 0,
    }
    result = realtime_result([item], "clinfer bench realtime")
    ratios = {ratio.name: ratio for ratio in result.ratios}
    assert ratios["realtime_p99_priority"].met is False
    assert ratios["realtime_kept_priority"].value == 0.8
    assert result.plots[0].categories == ["priority"]


def test_sweep_prefers_smaller_batch() -> None:
    medians = {(8, 1, 2): 9.0, (16, 1, 2): 9.8, (32, 1, 2): 10.0, (32, 2, 2): 7.0}
    assert choose_point(medians, 0.05) == (16, 1, 2)
    assert choose_point(medians, 0.0) == (32, 1, 2)


@pytest.mark.slow
def test_bench_all_small(tmp_path: Path) -> None:
    out = tmp_path / "report"
    completed = subprocess.run(
        [
            str(Path(sys.executable).with_name("clinfer")),
            "bench",
            "all",
            "--small",
            "--out",
            str(out),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    log = completed.stdout[-4000:] + completed.stderr[-4000:]

    data = json.loads((out / "report.json").read_text())
    by_name = {result["name"]: result for result in data["results"]}
    assert set(by_name) == ALL_NAMES, log
    errors = {name: r["raw"].get("error") for name, r in by_name.items()}
    assert errors == dict.fromkeys(ALL_NAMES), log
    assert completed.returncode == 0, log

    text = (out / "report.md").read_text()
    for name in ALL_NAMES:
        assert f"## {name}:" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == len(set(links))
    assert links
    for link in links:
        assert (out / link).read_bytes().startswith(PNG_MAGIC)

    sweep = by_name["sweep_pipeline"]
    assert set(sweep["chosen"]) == {"batch_size", "infer_actors", "decode_batch_size"}


def test_options_set_config_fields() -> None:
    args = ["--instances", "8", "--batch-size", "4", "--batch-size", "16"]
    config = config_from_options(SweepConfig(), [*args, "--tolerance", "0.1"])
    assert config.instances == 8
    assert config.batch_sizes == (4, 16)
    assert config.tolerance == 0.1
    assert config.infer_actors == SweepConfig().infer_actors


def test_options_reject_unknown_field() -> None:
    with pytest.raises(ClinferError, match="unknown option --colour"):
        config_from_options(SweepConfig(), ["--colour", "red"])
    with pytest.raises(ClinferError, match="invalid value"):
        config_from_options(SweepConfig(), ["--instances", "many"])


def test_decode_command_round_trips() -> None:
    from clinfer.bench.decode import DecodeConfig

    config = replace(DecodeConfig.small(), syntaxes=("RLELossless", "JPEG2000"))
    args = shlex.split(config.command)[3:]
    assert config_from_options(DecodeConfig(), args) == config
