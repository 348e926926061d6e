"""Tests of the ``cohort`` and ``train`` commands, registered as clinfer.cli does."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from clinfer.train.artifacts import METADATA_NAME
from clinfer.train.cli import cohort_command, train_command
from clinfer.train.cohort import MANIFEST_NAME, generate_cohort
from clinfer.train.training import (
    BREAST_CANCER_MODEL,
    EMR_MODEL,
    FUSION_MODEL,
    IMAGE_MODEL,
)


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    app.command("cohort")(cohort_command)
    app.command("train")(train_command)
    return app


def test_cohort_command_succeeds(app: typer.Typer, tmp_path: Path) -> None:
    args = ["cohort", "--n", "5", "--out", str(tmp_path / "c"), "--seed", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


def test_cohort_command_matches_function(app: typer.Typer, tmp_path: Path) -> None:
    args = ["cohort", "--n", "5", "--out", str(tmp_path / "cli"), "--seed", "3"]
    CliRunner().invoke(app, args)
    generate_cohort(5, tmp_path / "function", seed=3)
    written = (tmp_path / "cli" / MANIFEST_NAME).read_bytes()
    assert written == (tmp_path / "function" / MANIFEST_NAME).read_bytes()


def test_cohort_command_rejects_nonempty(app: typer.Typer, tmp_path: Path) -> None:
    (tmp_path / "other.txt").write_text("x", encoding="utf-8")
    args = ["cohort", "--n", "5", "--out", str(tmp_path), "--seed", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2


def test_cohort_command_rejects_zero(app: typer.Typer, tmp_path: Path) -> None:
    args = ["cohort", "--n", "0", "--out", str(tmp_path / "c"), "--seed", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2


def test_train_command_writes_models(
    app: typer.Typer, training_cohort: Path, tmp_path: Path
) -> None:
    args = ["train", "--cohort", str(training_cohort), "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--seed", "0"])
    assert result.exit_code == 0, result.output
    for name in (BREAST_CANCER_MODEL, IMAGE_MODEL, EMR_MODEL, FUSION_MODEL):
        assert (tmp_path / name / METADATA_NAME).is_file(), name


def test_train_command_rejects_missing_cohort(app: typer.Typer, tmp_path: Path) -> None:
    args = ["train", "--cohort", str(tmp_path / "none"), "--out", str(tmp_path / "m")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
