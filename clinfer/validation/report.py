"""Validate a trained model on held-out cases and write its report (MD, JSON, PNG)."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from clinfer import __version__  # noqa: E402
from clinfer.errors import ConfigurationError, ValidationError  # noqa: E402
from clinfer.train.artifacts import METADATA_NAME, load_trained_model  # noqa: E402
from clinfer.train.training import BREAST_CANCER_MODEL  # noqa: E402
from clinfer.validation import metrics as m  # noqa: E402
from clinfer.validation.cases import (  # noqa: E402
    SplitCases,
    input_names,
    load_cohort_cases,
    load_wisconsin_cases,
    predict_probabilities,
)
from clinfer.validation.gates import Gate, evaluate_gates, load_gates  # noqa: E402
from clinfer.validation.model_card import write_model_card  # noqa: E402

logger = logging.getLogger(__name__)

REPORT_SCHEMA = 1
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
PREDICTIONS_CSV = "predictions.csv"
RELIABILITY_PNG = "reliability.png"
ROC_PNG = "roc.png"


@dataclass(frozen=True)
class ValidationReport:
    """A written validation report: its folder and the JSON contents."""

    model_name: str
    directory: Path
    data: dict[str, Any]

    @property
    def overall(self) -> str:
        """``GO`` or ``NO-GO``."""
        return self.data["decision"]["overall"]


def model_version(metadata: Mapping[str, Any]) -> str:
    """Return the version shown for a model: ``version`` or 12 hex of its weights."""
    return str(metadata.get("version") or metadata["weights_sha256"][:12])


def _check_probabilities(
    probabilities: np.ndarray, cases: SplitCases, model: str
) -> np.ndarray:
    scores = np.asarray(probabilities, dtype=np.float64)
    if scores.shape != (len(cases),):
        raise ValidationError(
            f"model {model}: {cases.split} probabilities have shape {scores.shape}, "
            f"expected ({len(cases)},) in the order of the {cases.split} cases"
        )
    if not np.all(np.isfinite(scores)) or scores.min() < 0 or scores.max() > 1:
        raise ValidationError(
            f"model {model}: {cases.split} probabilities must be finite and in [0, 1]"
        )
    return scores


def compute_metrics(
    validation: SplitCases,
    validation_scores: np.ndarray,
    test: SplitCases,
    test_scores: np.ndarray,
    gates: Sequence[Gate],
) -> dict[str, Any]:
    """Return the report's metrics: threshold from validation, metrics on test.

    Raises
    ------
    ValidationError
        If the validation split lacks a class (no threshold can be chosen) or the
        test split lacks a class (no AUROC).
    """
    try:
        threshold = m.youden_threshold(validation.labels, validation_scores)
    except ValueError as exc:
        raise ValidationError(
            f"no operating point: the validation split ({len(validation)} cases) "
            f"has one class ({exc}); use a larger cohort"
        ) from exc
    if not m.has_both_classes(test.labels):
        raise ValidationError(
            f"the test split ({len(test)} cases) has one class, so AUROC is "
            "undefined; use a larger cohort"
        )
    auroc = m.auroc_with_ci(test.labels, test_scores)
    point = m.operating_point(test.labels, test_scores, threshold)
    calibration = m.calibration(test.labels, test_scores)
    subgroups = m.subgroup_table(test.labels, test_scores, threshold, test.attributes)
    gate_metrics = {
        "auroc": auroc["auroc"],
        "auroc_ci_lower": auroc["ci_lower"],
        "sensitivity": point["sensitivity"],
        "specificity": point["specificity"],
        "ppv": point["ppv"],
        "npv": point["npv"],
        "accuracy": point["accuracy"],
        "ece": calibration["ece"],
    }
    return {
        "threshold": {
            "value": threshold,
            "rule": m.THRESHOLD_RULE,
            "validation_n": len(validation),
            "validation_positives": int(validation.labels.sum()),
        },
        "test": {
            "n": len(test),
            "positives": int(test.labels.sum()),
            "auroc": {**auroc, "rule": m.CI_RULE},
            "operating_point": point,
            "calibration": {**calibration, "rule": m.ECE_RULE},
        },
        "subgroups": {
            "rows": subgroups,
            "min_n": m.MIN_SUBGROUP_N,
            "min_per_class": m.MIN_SUBGROUP_CLASS,
            "note": None
            if test.attributes
            else "the data set records no sex, age, manufacturer or view position",
        },
        "gate_metrics": gate_metrics,
        "decision": evaluate_gates(gates, gate_metrics),
    }


def _plot_reliability(calibration: dict[str, Any], title: str, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect")
    filled = [b for b in calibration["reliability"] if b["n"]]
    axis.plot(
        [b["mean_score"] for b in filled],
        [b["positive_fraction"] for b in filled],
        marker="o",
        label=f"model (ECE {calibration['ece']:.3f})",
    )
    for b in filled:
        axis.annotate(str(b["n"]), (b["mean_score"], b["positive_fraction"]), size=7)
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("mean predicted probability (bin)")
    axis.set_ylabel("observed positive fraction")
    axis.set_title(title, size=9)
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _plot_roc(
    labels: np.ndarray,
    scores: np.ndarray,
    point: dict[str, Any],
    title: str,
    path: Path,
) -> None:
    fpr, tpr, _ = roc_curve(labels, scores)
    figure, axis = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    axis.plot(fpr, tpr, label="ROC (test)")
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey")
    axis.plot(
        [1 - point["specificity"]],
        [point["sensitivity"]],
        marker="x",
        color="red",
        label=f"threshold {point['threshold']:.3f}",
    )
    axis.set_xlabel("1 - specificity")
    axis.set_ylabel("sensitivity")
    axis.set_title(title, size=9)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _write_predictions(
    path: Path, cases: Sequence[tuple[SplitCases, np.ndarray]]
) -> None:
    attribute_names = sorted({name for c, _ in cases for name in c.attributes})
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["split", "case_id", "label", "score", *attribute_names])
        for split_cases, scores in cases:
            for i, case_id in enumerate(split_cases.case_ids):
                values = [
                    split_cases.attributes.get(a, [""] * len(split_cases))[i]
                    for a in attribute_names
                ]
                writer.writerow(
                    [
                        split_cases.split,
                        case_id,
                        int(split_cases.labels[i]),
                        repr(float(scores[i])),
                        *values,
                    ]
                )


def read_predictions(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Read ``predictions.csv`` into per-split ``label`` and ``score`` arrays."""
    splits: dict[str, dict[str, list[float]]] = {}
    with Path(path).open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            split = splits.setdefault(row["split"], {"label": [], "score": []})
            split["label"].append(int(row["label"]))
            split["score"].append(float(row["score"]))
    return {
        name: {
            "label": np.asarray(values["label"], dtype=np.int64),
            "score": np.asarray(values["score"], dtype=np.float64),
        }
        for name, values in splits.items()
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def render_markdown(data: dict[str, Any]) -> str:
    """Return the Markdown text of a validation report's JSON data."""
    test = data["test"]
    auroc = test["auroc"]
    point = test["operating_point"]
    cm = point["confusion_matrix"]
    intervals = point["intervals"]
    lines = [
        f"# Validation report: {data['model']['name']} v{data['model']['version']}",
        "",
        f"**Decision: {data['decision']['overall']}**. {data['disclaimer']}",
        "",
        f"- Weights SHA-256: `{data['model']['weights_sha256']}`",
        f"- Data: {data['data']['description']}",
        f"- Test split: n = {test['n']}, positives = {test['positives']}",
        f"- Predictions: {data['predictions_source']}",
        "",
        "## Go/no-go gates (test split)",
        "",
        "| gate | observed | outcome |",
        "| --- | --- | --- |",
    ]
    for gate in data["decision"]["gates"]:
        lines.append(
            f"| {gate['condition']} | {_fmt(gate['observed'])} | {gate['outcome']} |"
        )
    lines += [
        "",
        "## Discrimination",
        "",
        f"AUROC {_fmt(auroc['auroc'])} (95 % CI {_fmt(auroc['ci_lower'])} to "
        f"{_fmt(auroc['ci_upper'])}; {auroc['rule']}).",
        "",
        f"![ROC curve]({ROC_PNG})",
        "",
        "## Operating point",
        "",
        f"Threshold {_fmt(data['threshold']['value'], 4)}: {data['threshold']['rule']} "
        f"(validation n = {data['threshold']['validation_n']}, positives = "
        f"{data['threshold']['validation_positives']}).",
        "",
        "| metric | value | 95 % Wilson CI |",
        "| --- | --- | --- |",
    ]
    for name in ("sensitivity", "specificity", "ppv", "npv", "accuracy"):
        interval = intervals[name]
        ci = (
            "n/a" if interval is None else f"{_fmt(interval[0])} to {_fmt(interval[1])}"
        )
        lines.append(f"| {name} | {_fmt(point[name])} | {ci} |")
    lines += [
        "",
        "Confusion matrix (rows: truth, columns: prediction):",
        "",
        "| | predicted negative | predicted positive |",
        "| --- | --- | --- |",
        f"| negative | {cm['tn']} | {cm['fp']} |",
        f"| positive | {cm['fn']} | {cm['tp']} |",
        "",
        "## Calibration",
        "",
        f"ECE {_fmt(test['calibration']['ece'])}; {test['calibration']['rule']}.",
        "",
        f"![reliability diagram]({RELIABILITY_PNG})",
        "",
        "## Subgroups (test split)",
        "",
    ]
    subgroups = data["subgroups"]
    if subgroups["note"]:
        lines.append(f"No subgroup table: {subgroups['note']}.")
    else:
        lines += [
            "| attribute | value | n | positives | AUROC | sensitivity | specificity "
            "| note |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in subgroups["rows"]:
            lines.append(
                f"| {row['attribute']} | {row['value']} | {row['n']} | "
                f"{row['positives']} | {_fmt(row['auroc'])} | "
                f"{_fmt(row['sensitivity'])} | {_fmt(row['specificity'])} | "
                f"{row['note'] or ''} |"
            )
    lines.append("")
    return "\n".join(lines)


def data_description(metadata: Mapping[str, Any]) -> str:
    """Return a sentence naming the model's data and saying what is synthetic."""
    if metadata["name"] == BREAST_CANCER_MODEL:
        return (
            "breast-cancer Wisconsin (diagnostic) data set, the real copy shipped "
            "with scikit-learn (569 fine-needle aspirate samples); held-out split "
            "rebuilt from the training seed"
        )
    training = metadata.get("training_data", {})
    return (
        "SYNTHETIC cohort generated by clinfer.train.cohort (phantom radiographs, "
        f"made-up EMR; cohort seed {training.get('cohort_seed')}, "
        f"{training.get('cohort_size')} patients); no real patient data"
    )


def validate_model(
    model_dir: Path,
    cases: Mapping[str, SplitCases],
    out_dir: Path,
    *,
    gates: Sequence[Gate],
    probabilities: Mapping[str, np.ndarray] | None = None,
    card: bool = True,
) -> ValidationReport:
    """Validate one saved model on validation and test cases; write its report.

    Parameters
    ----------
    model_dir
        Folder of one model as saved by ``clinfer.train`` (``model.pt`` and
        ``metadata.json``).
    cases
        ``validation`` and ``test`` cases (``load_cohort_cases`` or
        ``load_wisconsin_cases``).
    out_dir
        Report folder: ``report.md``, ``report.json``, ``predictions.csv``,
        ``reliability.png`` and ``roc.png`` are written into it.
    gates
        Go/no-go gates, checked on the test split.
    probabilities
        Precomputed positive-class probabilities per split, in case order, for
        example from the served model. Without them the PyTorch model is run here.
    card
        Whether to write the model card beside the model (``write_model_card``).

    Returns
    -------
    ValidationReport
        The report folder and contents.

    Raises
    ------
    ConfigurationError
        If the model files are missing or inconsistent.
    ValidationError
        If a split is missing, has one class, or the probabilities do not fit.
    """
    model_dir = Path(model_dir)
    for name in ("validation", "test"):
        if name not in cases:
            raise ValidationError(f"no {name} cases given for {model_dir}")
    if probabilities is None:
        model, metadata = load_trained_model(model_dir)
        scores = {
            name: predict_probabilities(model, metadata, cases[name])
            for name in ("validation", "test")
        }
        source = "PyTorch model run in process (clinfer.validation.cases)"
    else:
        metadata = json.loads((model_dir / METADATA_NAME).read_text(encoding="utf-8"))
        scores = {}
        for name in ("validation", "test"):
            if name not in probabilities:
                raise ValidationError(f"no {name} probabilities given for {model_dir}")
            scores[name] = probabilities[name]
        source = "precomputed probabilities passed by the caller"
    name = metadata["name"]
    for split in ("validation", "test"):
        scores[split] = _check_probabilities(scores[split], cases[split], name)

    results = compute_metrics(
        cases["validation"], scores["validation"], cases["test"], scores["test"], gates
    )
    data = {
        "schema": REPORT_SCHEMA,
        "clinfer_version": __version__,
        "model": {
            "name": name,
            "version": model_version(metadata),
            "weights_sha256": metadata["weights_sha256"],
            "directory": str(model_dir),
            "task": metadata.get("task"),
            "inputs": input_names(metadata),
        },
        "data": {
            "description": data_description(metadata),
            "synthetic": name != BREAST_CANCER_MODEL,
        },
        "disclaimer": "Research software: NOT FOR DIAGNOSTIC USE.",
        "predictions_source": source,
        **results,
        "files": {
            "markdown": REPORT_MD,
            "predictions": PREDICTIONS_CSV,
            "reliability_plot": RELIABILITY_PNG,
            "roc_plot": ROC_PNG,
        },
    }

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{name} v{data['model']['version']}, test split"
    _plot_reliability(results["test"]["calibration"], title, out_dir / RELIABILITY_PNG)
    _plot_roc(
        cases["test"].labels,
        scores["test"],
        results["test"]["operating_point"],
        title,
        out_dir / ROC_PNG,
    )
    _write_predictions(
        out_dir / PREDICTIONS_CSV,
        [(cases[s], scores[s]) for s in ("validation", "test")],
    )
    (out_dir / REPORT_JSON).write_text(json.dumps(data, indent=1), encoding="utf-8")
    (out_dir / REPORT_MD).write_text(render_markdown(data), encoding="utf-8")
    report = ValidationReport(name, out_dir, data)
    logger.info(
        "Validated %s v%s: test AUROC %.3f (CI %.3f-%.3f), %s; report in %s",
        name,
        data["model"]["version"],
        results["test"]["auroc"]["auroc"],
        results["test"]["auroc"]["ci_lower"],
        results["test"]["auroc"]["ci_upper"],
        report.overall,
        out_dir,
    )
    if card:
        write_model_card(model_dir, metadata=metadata, report=data)
    return report


def model_dirs(model_dir: Path) -> list[Path]:
    """Return ``model_dir`` if it holds one model, else its model subfolders.

    Raises
    ------
    ConfigurationError
        If no folder with ``metadata.json`` is found.
    """
    model_dir = Path(model_dir)
    if (model_dir / METADATA_NAME).is_file():
        return [model_dir]
    found = sorted(p.parent for p in model_dir.glob(f"*/{METADATA_NAME}"))
    if not found:
        raise ConfigurationError(
            f"no {METADATA_NAME} in {model_dir} or its subfolders; pass the output "
            "folder of `clinfer train` or one model folder in it"
        )
    return found


def validate_all(
    model_dir: Path,
    out_dir: Path,
    *,
    cohort_dir: Path | None = None,
    gates_path: Path | None = None,
    card: bool = True,
) -> list[ValidationReport]:
    """Validate every model under ``model_dir``; write ``out_dir/<model>/``.

    Cohort models are evaluated on the cohort's validation and test splits, the
    Wisconsin model on its own held-out split. Cohort images are preprocessed once
    for all models.

    Raises
    ------
    ConfigurationError
        If the models, gates or cohort are missing or invalid, or a cohort model
        is validated without ``cohort_dir``.
    ValidationError
        If a model cannot be evaluated (see ``validate_model``).
    """
    gates = load_gates(gates_path)
    directories = model_dirs(model_dir)
    metadata = {
        d: json.loads((d / METADATA_NAME).read_text(encoding="utf-8"))
        for d in directories
    }
    cohort_models = [
        d for d in directories if metadata[d]["name"] != BREAST_CANCER_MODEL
    ]
    cohort_cases = None
    if cohort_models:
        if cohort_dir is None:
            raise ConfigurationError(
                f"models {', '.join(metadata[d]['name'] for d in cohort_models)} "
                "were trained on a synthetic cohort; pass it with --cohort"
            )
        with_images = any("image" in input_names(metadata[d]) for d in cohort_models)
        cohort_cases = load_cohort_cases(Path(cohort_dir), with_images=with_images)
    reports = []
    for directory in directories:
        if metadata[directory]["name"] == BREAST_CANCER_MODEL:
            cases = load_wisconsin_cases(metadata[directory])
        else:
            cases = cohort_cases
        reports.append(
            validate_model(
                directory,
                cases,
                Path(out_dir) / metadata[directory]["name"],
                gates=gates,
                card=card,
            )
        )
    return reports
