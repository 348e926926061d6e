"""Tests of the validation metrics and gates on small hand-made score sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from clinfer.errors import ConfigurationError
from clinfer.validation import metrics as m
from clinfer.validation.gates import evaluate_gates, load_gates, parse_gates


def _scores(n: int = 200, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = np.clip(0.35 * labels + rng.normal(0.35, 0.2, n), 0, 1)
    return labels, scores


def test_auroc_matches_sklearn() -> None:
    labels, scores = _scores()
    summary = m.auroc_with_ci(labels, scores)
    assert summary["auroc"] == pytest.approx(roc_auc_score(labels, scores))


def test_ci_contains_point() -> None:
    labels, scores = _scores()
    summary = m.auroc_with_ci(labels, scores)
    assert summary["ci_lower"] <= summary["auroc"]
    assert summary["auroc"] <= summary["ci_upper"]


def test_ci_is_seeded() -> None:
    labels, scores = _scores()
    first = m.auroc_with_ci(labels, scores, seed=7)
    second = m.auroc_with_ci(labels, scores, seed=7)
    assert first == second


def test_bootstrap_auroc_handles_ties() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.2, 0.5, 0.5, 0.9, 0.5, 0.5])
    resampled = m._bootstrap_auroc(labels, scores, resamples=1, seed=0)
    # One resample of the stratified bootstrap, recomputed with sklearn.
    rng = np.random.default_rng(0)
    pos = scores[labels == 1][rng.integers(0, 3, size=(1, 3))][0]
    neg = scores[labels == 0][rng.integers(0, 3, size=(1, 3))][0]
    expected = roc_auc_score([1, 1, 1, 0, 0, 0], np.concatenate([pos, neg]))
    assert resampled[0] == pytest.approx(expected)


def test_one_class_has_no_auroc() -> None:
    summary = m.auroc_with_ci(np.ones(5, dtype=int), np.linspace(0, 1, 5))
    assert summary["auroc"] is None


def test_youden_separates_perfectly() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8])
    assert m.youden_threshold(labels, scores) == pytest.approx(0.7)


def test_operating_point_counts() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.6, 0.4, 0.7, 0.9])
    point = m.operating_point(labels, scores, 0.5)
    assert point["confusion_matrix"] == {"tn": 1, "fp": 1, "fn": 1, "tp": 2}
    assert point["sensitivity"] == pytest.approx(2 / 3)
    assert point["specificity"] == pytest.approx(0.5)
    assert point["ppv"] == pytest.approx(2 / 3)
    assert point["npv"] == pytest.approx(0.5)


def test_ece_by_hand() -> None:
    labels = np.array([0, 1, 1, 1])
    scores = np.array([0.05, 0.05, 0.95, 1.0])
    # Bin 0: mean 0.05, fraction 0.5; bin 9: mean 0.975, fraction 1.
    expected = 0.5 * 0.45 + 0.5 * 0.025
    assert m.calibration(labels, scores)["ece"] == pytest.approx(expected)


def test_ece_bins_count_all_cases() -> None:
    labels, scores = _scores()
    bins = m.calibration(labels, scores)["reliability"]
    assert sum(b["n"] for b in bins) == len(labels)


def test_subgroup_rows_sum_to_n() -> None:
    labels, scores = _scores()
    rng = np.random.default_rng(3)
    attributes = {
        "sex": rng.choice(["F", "M"], len(labels)).tolist(),
        "site": rng.choice(["a", "b", "c"], len(labels), p=[0.8, 0.17, 0.03]).tolist(),
    }
    rows = m.subgroup_table(labels, scores, 0.5, attributes)
    for attribute in attributes:
        total = sum(row["n"] for row in rows if row["attribute"] == attribute)
        assert total == len(labels)


def test_small_subgroup_has_no_auroc() -> None:
    labels, scores = _scores(n=30)
    attributes = {"site": ["big"] * 25 + ["small"] * 5}
    rows = {
        row["value"]: row for row in m.subgroup_table(labels, scores, 0.5, attributes)
    }
    assert rows["small"]["auroc"] is None
    assert "n too small" in rows["small"]["note"]


def test_age_bands() -> None:
    bands = [m.age_band(age) for age in (25, 50, 64, 65, 80, 95)]
    assert bands == ["<50", "50-64", "50-64", "65-79", ">=80", ">=80"]


def test_default_gates_load() -> None:
    metrics = [gate.metric for gate in load_gates()]
    assert "auroc_ci_lower" in metrics


def test_gate_flips_when_tightened() -> None:
    observed = {"sensitivity": 0.9}
    loose = parse_gates(
        {"gates": [{"metric": "sensitivity", "op": ">=", "value": 0.85}]}, "t"
    )
    tight = parse_gates(
        {"gates": [{"metric": "sensitivity", "op": ">=", "value": 0.95}]}, "t"
    )
    assert evaluate_gates(loose, observed)["overall"] == "GO"
    assert evaluate_gates(tight, observed)["overall"] == "NO-GO"


def test_missing_metric_is_no_go() -> None:
    gates = parse_gates({"gates": [{"metric": "ppv", "op": ">=", "value": 0.5}]}, "t")
    assert evaluate_gates(gates, {"ppv": None})["overall"] == "NO-GO"


def test_unknown_gate_metric_rejected() -> None:
    with pytest.raises(ConfigurationError, match="f1"):
        parse_gates({"gates": [{"metric": "f1", "op": ">=", "value": 0.5}]}, "t")


def test_missing_gates_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not found"):
        load_gates(tmp_path / "none.toml")
