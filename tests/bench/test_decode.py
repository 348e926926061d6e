"""The decode benchmark in its small mode: the structure of its result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clinfer.bench.decode import SYNTAX_FILES, DecodeConfig, run
from clinfer.bench.schema import BenchResult

from clinfer.errors import ConfigurationError


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> BenchResult:
    return run(DecodeConfig.small(), tmp_path_factory.mktemp("p4"))


def test_result_name(result: BenchResult) -> None:
    assert result.name == "p4"
    assert result.command.startswith("clinfer bench decode")


def test_every_syntax_accounted(result: BenchResult) -> None:
    measured = set(result.raw["syntax_order"])
    unsupported = set(result.raw["unsupported"])
    assert measured | unsupported == {syntax.keyword for syntax in SYNTAX_FILES}
    assert not measured & unsupported


def test_ratio_per_measured_syntax(result: BenchResult) -> None:
    names = {ratio.name for ratio in result.ratios}
    for keyword in result.raw["syntax_order"]:
        assert f"p4_{keyword}" in names


def test_ratios_positive(result: BenchResult) -> None:
    for ratio in result.ratios:
        assert ratio.value > 0, ratio.name
        assert ratio.numerator > 0, ratio.name
        assert ratio.denominator > 0, ratio.name


def test_preprocess_ratio_monochrome(result: BenchResult) -> None:
    names = {ratio.name for ratio in result.ratios}
    assert "p4_ExplicitVRLittleEndian_with_preprocess" in names
    # The corpus has JPEG Baseline files in colour only, which are not preprocessed.
    assert "p4_JPEGBaseline8Bit_with_preprocess" not in names


def test_core_syntaxes_measured(result: BenchResult) -> None:
    measured = result.raw["syntax_order"]
    for keyword in (
        "ExplicitVRLittleEndian",
        "ImplicitVRLittleEndian",
        "ExplicitVRBigEndian",
        "DeflatedExplicitVRLittleEndian",
        "RLELossless",
        "JPEGBaseline8Bit",
        "JPEGLosslessSV1",
        "JPEGLSLossless",
        "JPEGLSNearLossless",
        "JPEG2000Lossless",
        "JPEG2000",
    ):
        assert keyword in measured


def test_unsupported_have_reasons(result: BenchResult) -> None:
    assert "HTJ2K" in result.raw["unsupported"]
    for keyword, reason in result.raw["unsupported"].items():
        assert reason, keyword


def test_broken_12bit_file_listed(result: BenchResult) -> None:
    rejected = {item["file"]: item for item in result.raw["unsupported_files"]}
    assert rejected["JPEG-lossy.dcm"]["reason"] == "decode_failed"
    assert rejected["JPEG-lossy.dcm"]["syntax"] == "JPEGExtended12Bit"


def test_syntax_records(result: BenchResult) -> None:
    for keyword in result.raw["syntax_order"]:
        record = result.raw["syntaxes"][keyword]
        assert record["files"], keyword
        assert record["clinfer_plugin"] != "none", keyword
        assert record["fastest"] in record["decoders"], keyword
        assert record["fastest_frames_per_s"] > 0, keyword
        assert record["clinfer_mb_per_s"] > 0, keyword


def test_fastest_is_standalone(result: BenchResult) -> None:
    for keyword in result.raw["syntax_order"]:
        record = result.raw["syntaxes"][keyword]
        assert not record["fastest"].startswith("clinfer"), keyword


def test_compressed_plugins_compared(result: BenchResult) -> None:
    record = result.raw["syntaxes"]["JPEG2000Lossless"]
    assert "pydicom:pylibjpeg" in record["decoders"]
    assert "openjpeg" in record["decoders"]
    assert record["clinfer_plugin"] in ("gdcm", "pylibjpeg", "pillow")


def test_near_lossless_copy_has_uids(result: BenchResult) -> None:
    record = result.raw["syntaxes"]["JPEGLSNearLossless"]
    added = record["files"][0]["uids_added_to_copy"]
    assert "StudyInstanceUID" in added


def test_plot_categories(result: BenchResult) -> None:
    plot = next(plot for plot in result.plots if plot.name == "p4_frames_per_s")
    assert plot.categories == result.raw["syntax_order"]
    for series in plot.series:
        assert len(series.x) == len(series.y), series.label
        assert all(0 <= x < len(plot.categories) for x in series.x), series.label


def test_result_is_json(result: BenchResult) -> None:
    data = json.loads(json.dumps(result.to_json()))
    assert data["name"] == "p4"


def test_unknown_syntax_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="NoSuchSyntax"):
        run(DecodeConfig(syntaxes=("NoSuchSyntax",)), tmp_path)


def test_syntax_filter(tmp_path: Path) -> None:
    config = DecodeConfig(
        files_per_syntax=1, repeats=1, min_pass_s=0.001, syntaxes=("RLELossless",)
    )
    filtered = run(config, tmp_path)
    assert filtered.raw["syntax_order"] == ["RLELossless"]
    assert "--syntax RLELossless" in filtered.command
