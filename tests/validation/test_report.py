"""Tests of validation reports and model cards on models trained once per session."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from clinfer.errors import ValidationError
from clinfer.train.cohort import CohortManifest
from clinfer.train.training import (
    BREAST_CANCER_MODEL,
    EMR_MODEL,
    FUSION_MODEL,
    IMAGE_MODEL,
    TrainingReport,
)
from clinfer.validation.cases import load_wisconsin_cases
from clinfer.validation.cli import register
from clinfer.validation.gates import parse_gates
from clinfer.validation.model_card import MODEL_CARD_JSON, MODEL_CARD_MD
from clinfer.validation.report import (
    PREDICTIONS_CSV,
    RELIABILITY_PNG,
    REPORT_JSON,
    REPORT_MD,
    ROC_PNG,
    ValidationReport,
    read_predictions,
    validate_model,
)

ALL_MODELS = (BREAST_CANCER_MODEL, IMAGE_MODEL, EMR_MODEL, FUSION_MODEL)
COHORT_MODELS = (IMAGE_MODEL, EMR_MODEL, FUSION_MODEL)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _stored(report: ValidationReport) -> dict[str, dict[str, np.ndarray]]:
    return read_predictions(report.directory / PREDICTIONS_CSV)


def test_every_model_reported(reports: dict[str, ValidationReport]) -> None:
    assert sorted(reports) == sorted(ALL_MODELS)


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize(
    "filename", [REPORT_MD, REPORT_JSON, PREDICTIONS_CSV, RELIABILITY_PNG, ROC_PNG]
)
def test_report_file_written(
    reports: dict[str, ValidationReport], name: str, filename: str
) -> None:
    assert (reports[name].directory / filename).stat().st_size > 0


@pytest.mark.parametrize("name", ALL_MODELS)
def test_plots_are_png(reports: dict[str, ValidationReport], name: str) -> None:
    for filename in (RELIABILITY_PNG, ROC_PNG):
        assert (reports[name].directory / filename).read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("name", ALL_MODELS)
def test_json_matches_returned(reports: dict[str, ValidationReport], name: str) -> None:
    stored = json.loads((reports[name].directory / REPORT_JSON).read_text())
    assert stored == reports[name].data


@pytest.mark.parametrize("name", ALL_MODELS)
def test_auroc_recomputed(reports: dict[str, ValidationReport], name: str) -> None:
    test = _stored(reports[name])["test"]
    expected = roc_auc_score(test["label"], test["score"])
    assert reports[name].data["test"]["auroc"]["auroc"] == pytest.approx(expected)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_sensitivity_specificity_recomputed(
    reports: dict[str, ValidationReport], name: str
) -> None:
    data = reports[name].data
    test = _stored(reports[name])["test"]
    predicted = test["score"] >= data["threshold"]["value"]
    positives = test["label"] == 1
    sensitivity = np.mean(predicted[positives])
    specificity = np.mean(~predicted[~positives])
    assert data["test"]["operating_point"]["sensitivity"] == pytest.approx(sensitivity)
    assert data["test"]["operating_point"]["specificity"] == pytest.approx(specificity)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_threshold_is_youden_on_validation(
    reports: dict[str, ValidationReport], name: str
) -> None:
    validation = _stored(reports[name])["validation"]
    labels, scores = validation["label"], validation["score"]
    best = max(
        np.mean(scores[labels == 1] >= t) + np.mean(scores[labels == 0] < t) - 1
        for t in np.unique(scores)
    )
    threshold = reports[name].data["threshold"]["value"]
    chosen = (
        np.mean(scores[labels == 1] >= threshold)
        + np.mean(scores[labels == 0] < threshold)
        - 1
    )
    assert chosen == pytest.approx(best)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_ci_contains_point(reports: dict[str, ValidationReport], name: str) -> None:
    auroc = reports[name].data["test"]["auroc"]
    assert auroc["ci_lower"] <= auroc["auroc"] <= auroc["ci_upper"]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_pytorch_predictions_match_training(
    reports: dict[str, ValidationReport],
    validation_models: TrainingReport,
    name: str,
) -> None:
    # The training run's test AUROC comes from the same weights and inputs.
    recorded = validation_models.models[name].test_metrics["auroc"]
    assert reports[name].data["test"]["auroc"]["auroc"] == pytest.approx(recorded)


@pytest.mark.parametrize("name", COHORT_MODELS)
def test_subgroup_rows_sum_to_n(
    reports: dict[str, ValidationReport], name: str
) -> None:
    data = reports[name].data
    rows = data["subgroups"]["rows"]
    for attribute in ("sex", "age_band", "manufacturer", "view_position"):
        total = sum(row["n"] for row in rows if row["attribute"] == attribute)
        assert total == data["test"]["n"]


def test_wisconsin_has_no_subgroups(reports: dict[str, ValidationReport]) -> None:
    subgroups = reports[BREAST_CANCER_MODEL].data["subgroups"]
    assert subgroups["rows"] == []
    assert "records no sex" in subgroups["note"]


def test_wisconsin_accuracy(reports: dict[str, ValidationReport]) -> None:
    point = reports[BREAST_CANCER_MODEL].data["test"]["operating_point"]
    assert point["accuracy"] >= 0.95


def test_wisconsin_split_size(reports: dict[str, ValidationReport]) -> None:
    # 25 % of 569 samples, as in training.
    assert reports[BREAST_CANCER_MODEL].data["test"]["n"] == 143


def test_overall_is_all_gates(reports: dict[str, ValidationReport]) -> None:
    for report in reports.values():
        outcomes = {gate["outcome"] for gate in report.data["decision"]["gates"]}
        expected = "GO" if outcomes == {"GO"} else "NO-GO"
        assert report.overall == expected


def test_markdown_states_decision(reports: dict[str, ValidationReport]) -> None:
    for report in reports.values():
        text = (report.directory / REPORT_MD).read_text()
        assert f"**Decision: {report.overall}**" in text


def test_cohort_report_says_synthetic(reports: dict[str, ValidationReport]) -> None:
    text = (reports[FUSION_MODEL].directory / REPORT_MD).read_text()
    assert "SYNTHETIC" in text


def test_precomputed_probabilities_used(models_root: Path, tmp_path: Path) -> None:
    metadata = json.loads(
        (models_root / BREAST_CANCER_MODEL / "metadata.json").read_text()
    )
    cases = load_wisconsin_cases(metadata)
    # Perfect scores: the labels themselves.
    probabilities = {name: c.labels.astype(float) for name, c in cases.items()}
    gates = parse_gates(
        {"gates": [{"metric": "auroc", "op": ">=", "value": 0.99}]}, "t"
    )
    report = validate_model(
        models_root / BREAST_CANCER_MODEL,
        cases,
        tmp_path / "out",
        gates=gates,
        probabilities=probabilities,
        card=False,
    )
    assert report.data["test"]["auroc"]["auroc"] == pytest.approx(1.0)
    assert report.data["predictions_source"].startswith("precomputed")


def test_probabilities_wrong_length_rejected(models_root: Path, tmp_path: Path) -> None:
    metadata = json.loads(
        (models_root / BREAST_CANCER_MODEL / "metadata.json").read_text()
    )
    cases = load_wisconsin_cases(metadata)
    probabilities = {"validation": np.zeros(3), "test": np.zeros(3)}
    gates = parse_gates({"gates": [{"metric": "auroc", "op": ">=", "value": 0.9}]}, "t")
    with pytest.raises(ValidationError, match="shape"):
        validate_model(
            models_root / BREAST_CANCER_MODEL,
            cases,
            tmp_path / "out",
            gates=gates,
            probabilities=probabilities,
            card=False,
        )


@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_card_written(
    reports: dict[str, ValidationReport], models_root: Path, name: str
) -> None:
    for filename in (MODEL_CARD_MD, MODEL_CARD_JSON):
        assert (models_root / name / filename).stat().st_size > 0


@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_card_agrees_with_report(
    reports: dict[str, ValidationReport], models_root: Path, name: str
) -> None:
    card = json.loads((models_root / name / MODEL_CARD_JSON).read_text())
    test = _stored(reports[name])["test"]
    assert card["validation"]["auroc"] == pytest.approx(
        roc_auc_score(test["label"], test["score"])
    )
    assert card["validation"]["decision"] == reports[name].overall
    assert (
        card["model"]["weights_sha256"] == reports[name].data["model"]["weights_sha256"]
    )


def test_model_card_training_data_statements(
    reports: dict[str, ValidationReport], models_root: Path
) -> None:
    fusion = (models_root / FUSION_MODEL / MODEL_CARD_MD).read_text()
    wisconsin = (models_root / BREAST_CANCER_MODEL / MODEL_CARD_MD).read_text()
    assert "SYNTHETIC data only" in fusion
    assert "scikit-learn" in wisconsin
    assert "NOT FOR DIAGNOSTIC USE" in fusion


def test_cli_tightened_gate_flips(
    models_root: Path, validation_cohort: CohortManifest, tmp_path: Path
) -> None:
    app = typer.Typer()
    register(app)
    # A second command keeps typer from collapsing the app into one command.
    app.command("noop")(lambda: None)
    loose = tmp_path / "loose.toml"
    loose.write_text('[[gates]]\nmetric = "accuracy"\nop = ">="\nvalue = 0.5\n')
    tight = tmp_path / "tight.toml"
    tight.write_text('[[gates]]\nmetric = "accuracy"\nop = ">="\nvalue = 0.999\n')
    outcomes = []
    for gates in (loose, tight):
        out = tmp_path / gates.stem
        args = [
            "validate",
            "--model-dir",
            str(models_root / BREAST_CANCER_MODEL),
            "--out",
            str(out),
            "--gates",
            str(gates),
            "--no-model-card",
        ]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        data = json.loads((out / BREAST_CANCER_MODEL / REPORT_JSON).read_text())
        outcomes.append(data["decision"]["overall"])
    assert outcomes == ["GO", "NO-GO"]


def test_cli_needs_cohort(models_root: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    args = ["validate", "--model-dir", str(models_root), "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "--cohort" in result.output
