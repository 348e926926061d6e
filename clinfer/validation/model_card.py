"""Write a model card (Markdown and JSON) beside a trained model's files."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clinfer.errors import ConfigurationError
from clinfer.train.artifacts import METADATA_NAME
from clinfer.train.training import BREAST_CANCER_MODEL

logger = logging.getLogger(__name__)

MODEL_CARD_MD = "model_card.md"
MODEL_CARD_JSON = "model_card.json"
MODEL_CARD_SCHEMA = 1
NOT_FOR_DIAGNOSTIC_USE = (
    "NOT FOR DIAGNOSTIC USE. This model is research and test software. It has not "
    "been cleared or approved by any regulator, and its outputs must not inform the "
    "diagnosis or treatment of any patient."
)


def _training_data(metadata: Mapping[str, Any]) -> dict[str, Any]:
    training = dict(metadata.get("training_data", {}))
    if metadata["name"] == BREAST_CANCER_MODEL:
        statement = (
            "Real data: the breast-cancer Wisconsin (diagnostic) data set as "
            "shipped with scikit-learn (sklearn.datasets.load_breast_cancer): 569 "
            "fine-needle aspirate samples with 30 nucleus features, label 1 = "
            "malignant. It is a small, old, single-centre set."
        )
    else:
        statement = (
            "SYNTHETIC data only. The chest radiographs are phantoms drawn by "
            "clinfer's cohort generator (clinfer.train.cohort), not radiographs of "
            "people; the EMR values are independent random draws, and the label is "
            f"the synthetic rule `{training.get('label')}`. No real patient data "
            "were used."
        )
    return {"statement": statement, **training}


def _limitations(metadata: Mapping[str, Any]) -> list[str]:
    common = [
        "Performance was measured on one held-out split of the training data "
        "source, not on an external or prospective population.",
        "The operating point was chosen on the validation split of the same source; "
        "it has to be re-chosen for any new site or population.",
    ]
    if metadata["name"] == BREAST_CANCER_MODEL:
        return [
            *common,
            "The Wisconsin set records no age, ethnicity, site or device, so no "
            "subgroup performance could be measured.",
        ]
    return [
        *common,
        "The images are synthetic phantoms with drawn nodules or opacities, so the "
        "metrics say nothing about performance on real radiographs.",
        "The label is a synthetic rule on a finding and an EMR risk score; it is "
        "not a clinical diagnosis.",
        "Subgroups (sex, age band, invented manufacturers, view position) are "
        "synthetic attributes; their table tests the reporting, not fairness.",
    ]


def build_model_card(
    metadata: Mapping[str, Any], report: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Return the model card contents from a model's metadata and its report.

    ``report`` is the ``report.json`` data of ``validate_model``; without it the
    card carries the training metrics only.
    """
    card: dict[str, Any] = {
        "schema": MODEL_CARD_SCHEMA,
        "model": {
            "name": metadata["name"],
            "version": str(metadata.get("version") or metadata["weights_sha256"][:12]),
            "weights_sha256": metadata["weights_sha256"],
            "architecture": metadata.get("architecture"),
            "inputs": metadata.get("inputs"),
            "labels": metadata.get("labels"),
            "code_version": metadata.get("code_version"),
        },
        "intended_use": {
            "purpose": f"{metadata.get('task')}; for testing clinfer's export, "
            "serving, validation and DICOM output paths.",
            "users": "developers and integrators of clinfer",
            "out_of_scope": "any clinical use, including triage, screening, "
            "second reading or decision support",
        },
        "training_data": _training_data(metadata),
        "training": {
            "seed": metadata.get("seed"),
            "epochs": metadata.get("epochs"),
            "best_epoch": metadata.get("best_epoch"),
            "selection": metadata.get("selection"),
        },
        "training_metrics": metadata.get("metrics"),
        "limitations": _limitations(metadata),
        "not_for_diagnostic_use": NOT_FOR_DIAGNOSTIC_USE,
        "validation": None,
    }
    if report is not None:
        test = report["test"]
        card["validation"] = {
            "decision": report["decision"]["overall"],
            "gates": report["decision"]["gates"],
            "threshold": report["threshold"],
            "test_n": test["n"],
            "test_positives": test["positives"],
            "auroc": test["auroc"]["auroc"],
            "auroc_ci": [test["auroc"]["ci_lower"], test["auroc"]["ci_upper"]],
            "auroc_ci_rule": test["auroc"]["rule"],
            "sensitivity": test["operating_point"]["sensitivity"],
            "specificity": test["operating_point"]["specificity"],
            "ppv": test["operating_point"]["ppv"],
            "npv": test["operating_point"]["npv"],
            "accuracy": test["operating_point"]["accuracy"],
            "ece": test["calibration"]["ece"],
            "ece_rule": test["calibration"]["rule"],
            "predictions_source": report["predictions_source"],
        }
    return card


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def render_model_card(card: Mapping[str, Any]) -> str:
    """Return the Markdown text of a model card."""
    model = card["model"]
    use = card["intended_use"]
    lines = [
        f"# Model card: {model['name']} v{model['version']}",
        "",
        f"> **{card['not_for_diagnostic_use']}**",
        "",
        f"- Weights SHA-256: `{model['weights_sha256']}`",
        f"- Architecture: `{json.dumps(model['architecture'])}`",
        f"- Inputs: {', '.join(i['name'] for i in model['inputs'] or [])}",
        "",
        "## Intended use",
        "",
        f"- Purpose: {use['purpose']}",
        f"- Users: {use['users']}",
        f"- Out of scope: {use['out_of_scope']}",
        "",
        "## Training data",
        "",
        card["training_data"]["statement"],
        "",
    ]
    sizes = card["training_data"].get("split_sizes")
    if sizes:
        lines += [
            "Split sizes: "
            + ", ".join(f"{name} {size}" for name, size in sizes.items())
            + ".",
            "",
        ]
    lines += ["## Metrics", ""]
    validation = card["validation"]
    if validation is None:
        test = (card["training_metrics"] or {}).get("test", {})
        lines.append(
            f"Not validated yet; training-time test AUROC {_number(test.get('auroc'))}."
        )
    else:
        ci = validation["auroc_ci"]
        lines += [
            f"Held-out test split, n = {validation['test_n']} "
            f"({validation['test_positives']} positive). Decision: "
            f"**{validation['decision']}**.",
            "",
            "| metric | value |",
            "| --- | --- |",
            f"| AUROC (95 % CI) | {_number(validation['auroc'])} "
            f"({_number(ci[0])} to {_number(ci[1])}) |",
            f"| threshold | {validation['threshold']['value']:.4f} |",
            f"| sensitivity | {_number(validation['sensitivity'])} |",
            f"| specificity | {_number(validation['specificity'])} |",
            f"| PPV | {_number(validation['ppv'])} |",
            f"| NPV | {_number(validation['npv'])} |",
            f"| accuracy | {_number(validation['accuracy'])} |",
            f"| ECE | {_number(validation['ece'])} |",
            "",
            f"Threshold: {validation['threshold']['rule']}. AUROC CI: "
            f"{validation['auroc_ci_rule']}. ECE: {validation['ece_rule']}.",
            "",
            "| gate | observed | outcome |",
            "| --- | --- | --- |",
        ]
        for gate in validation["gates"]:
            lines.append(
                f"| {gate['condition']} | {_number(gate['observed'])} | "
                f"{gate['outcome']} |"
            )
    lines += ["", "## Limitations", ""]
    lines += [f"- {item}" for item in card["limitations"]]
    lines.append("")
    return "\n".join(lines)


def write_model_card(
    version_dir: Path,
    *,
    metadata: Mapping[str, Any] | None = None,
    report: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``model_card.md`` and ``model_card.json`` into a model's folder.

    Parameters
    ----------
    version_dir
        Folder of one model version (``metadata.json`` and ``model.pt``).
    metadata
        The model's metadata; read from ``version_dir`` when omitted.
    report
        The ``report.json`` data of ``validate_model``, whose test metrics and
        gate outcomes the card repeats.

    Returns
    -------
    tuple of pathlib.Path
        The Markdown and JSON paths.

    Raises
    ------
    ConfigurationError
        If ``metadata`` is omitted and ``version_dir/metadata.json`` is missing,
        or the report belongs to other weights.
    """
    version_dir = Path(version_dir)
    if metadata is None:
        path = version_dir / METADATA_NAME
        if not path.is_file():
            raise ConfigurationError(
                f"{path} not found; pass a model folder written by `clinfer train`"
            )
        metadata = json.loads(path.read_text(encoding="utf-8"))
    if report is not None and (
        report["model"]["weights_sha256"] != metadata["weights_sha256"]
    ):
        raise ConfigurationError(
            f"the validation report is for weights {report['model']['weights_sha256']}"
            f" but {version_dir} has {metadata['weights_sha256']}; validate this "
            "model again"
        )
    card = build_model_card(metadata, report)
    markdown = version_dir / MODEL_CARD_MD
    json_path = version_dir / MODEL_CARD_JSON
    json_path.write_text(json.dumps(card, indent=1), encoding="utf-8")
    markdown.write_text(render_model_card(card), encoding="utf-8")
    logger.info("Wrote model card of %s to %s", metadata["name"], markdown)
    return markdown, json_path
