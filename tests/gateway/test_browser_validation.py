"""The web page shows a real validation report of the served model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from clinfer.gateway.app import GatewaySettings
from clinfer.train.artifacts import METADATA_NAME
from clinfer.validation.cases import SplitCases
from clinfer.validation.gates import load_gates
from clinfer.validation.report import REPORT_JSON, validate_model

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
QUERY_TOKEN = "query-token-alice"
MODEL = "cxr_resnet"


def _cases(
    split: str, rng: np.random.Generator, n: int
) -> tuple[SplitCases, np.ndarray]:
    labels = np.arange(n) % 2
    # Scores that separate the classes partly, so AUROC is strictly between 0.5 and 1.
    scores = np.clip(0.35 + 0.3 * labels + rng.normal(0.0, 0.15, n), 0.0, 1.0)
    cases = SplitCases(split, list(range(n)), labels, np.zeros((n, 1), np.float32))
    return cases, scores


@pytest.fixture
def report(tmp_path: Path) -> dict:
    """Write a validation report of cxr_resnet with ``validate_model``."""
    model_dir = tmp_path / "models" / MODEL
    model_dir.mkdir(parents=True)
    metadata = {"name": MODEL, "weights_sha256": "0" * 64, "version": "1"}
    (model_dir / METADATA_NAME).write_text(json.dumps(metadata), encoding="utf-8")
    rng = np.random.default_rng(7)
    validation, validation_scores = _cases("validation", rng, 60)
    test, test_scores = _cases("test", rng, 60)
    validate_model(
        model_dir,
        {"validation": validation, "test": test},
        tmp_path / "validation" / MODEL,
        gates=load_gates(),
        probabilities={"validation": validation_scores, "test": test_scores},
        card=False,
    )
    path = tmp_path / "validation" / MODEL / REPORT_JSON
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture
def settings(
    settings: GatewaySettings, report: dict, tmp_path: Path
) -> GatewaySettings:
    return dataclasses.replace(settings, validation_dir=tmp_path / "validation")


def test_page_shows_validation(page, live_gateway: str, report: dict) -> None:
    page.goto(live_gateway + "/")
    page.fill("#token", QUERY_TOKEN)
    page.set_input_files("#files", get_testdata_file("CT_small.dcm"))
    page.click("#submit")
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "gateway-validation.png"), full_page=True)
    text = page.inner_text("#validation")
    auroc = report["test"]["auroc"]
    assert f"Validation: {report['decision']['overall']}," in text
    assert f"test AUROC {auroc['auroc']:.3f}" in text
    assert f"95% CI {auroc['ci_lower']:.3f}–{auroc['ci_upper']:.3f}" in text
    assert f"on {report['test']['n']} cases" in text
    assert f"operating threshold {report['threshold']['value']:.3f}" in text
    assert "no validation report" not in text
