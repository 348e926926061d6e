"""Served thresholds follow the validation reports' operating points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clinfer.export.composition import composition_spec
from clinfer.export.multimodal import apply_validated_thresholds, build_plans

from clinfer.errors import ConfigurationError
from clinfer.train.training import EMR_MODEL, FUSION_MODEL


def _write_report(root: Path, name: str, threshold: object, weights: str) -> None:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    report = {
        "model": {"weights_sha256": weights},
        "threshold": {"value": threshold, "rule": "Youden J on validation"},
        "decision": {"overall": "GO"},
    }
    (folder / "report.json").write_text(json.dumps(report), encoding="utf-8")


def _weights(plans: dict, name: str) -> str:
    return plans[name].spec["training"]["weights_sha256"]


def test_matching_report_sets_threshold(mm_models: Path, tmp_path: Path) -> None:
    plans = build_plans(mm_models)
    _write_report(tmp_path, FUSION_MODEL, 0.255, _weights(plans, FUSION_MODEL))
    apply_validated_thresholds(plans, tmp_path)
    assert plans[FUSION_MODEL].spec["threshold"] == pytest.approx(0.255)


def test_composition_uses_fusion_threshold(mm_models: Path, tmp_path: Path) -> None:
    plans = build_plans(mm_models)
    _write_report(tmp_path, FUSION_MODEL, 0.31, _weights(plans, FUSION_MODEL))
    apply_validated_thresholds(plans, tmp_path)
    spec = composition_spec({name: plan.spec for name, plan in plans.items()})
    assert spec["threshold"] == pytest.approx(0.31)


def test_report_of_other_weights_ignored(mm_models: Path, tmp_path: Path) -> None:
    plans = build_plans(mm_models)
    _write_report(tmp_path, EMR_MODEL, 0.2, "0" * 64)
    applied = apply_validated_thresholds(plans, tmp_path)
    assert EMR_MODEL not in applied
    assert plans[EMR_MODEL].spec["threshold"] == 0.5


def test_unreadable_report_rejected(mm_models: Path, tmp_path: Path) -> None:
    plans = build_plans(mm_models)
    _write_report(tmp_path, FUSION_MODEL, "high", _weights(plans, FUSION_MODEL))
    with pytest.raises(ConfigurationError, match="rerun `clinfer validate`"):
        apply_validated_thresholds(plans, tmp_path)
