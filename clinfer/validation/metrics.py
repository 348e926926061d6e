"""Binary-classifier metrics: AUROC with bootstrap CI, operating point, ECE."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_auc_score, roc_curve

logger = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95
ECE_BINS = 10
# Subgroups smaller than this, or with fewer than MIN_SUBGROUP_CLASS cases of
# either class, get no AUROC: its sampling error would exceed the differences
# a subgroup analysis looks for.
MIN_SUBGROUP_N = 20
MIN_SUBGROUP_CLASS = 5
THRESHOLD_RULE = (
    "Youden's J (sensitivity + specificity - 1) maximised on the validation split "
    "(sklearn.metrics.roc_curve; the highest threshold wins a tie), then applied "
    "unchanged to the test split; a case is positive when its score >= threshold"
)
ECE_RULE = (
    f"{ECE_BINS} equal-width probability bins [0, 0.1), ..., [0.9, 1.0]; ECE = "
    "sum over bins of (bin n / N) * |mean predicted probability - observed positive "
    "fraction|"
)
CI_RULE = (
    f"percentile bootstrap, {BOOTSTRAP_RESAMPLES} resamples stratified by class "
    f"(positives and negatives resampled separately), numpy seed {BOOTSTRAP_SEED}"
)


def check_inputs(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return labels as int 0/1 and scores as float64, after checking them.

    Raises
    ------
    ValueError
        If the arrays are not 1-D of one length, labels are not 0/1, or scores are
        not finite.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(
            f"labels and scores must be 1-D of one length, got {labels.shape} and "
            f"{scores.shape}"
        )
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    return labels.astype(np.int64), scores


def has_both_classes(labels: np.ndarray) -> bool:
    """Return whether ``labels`` has at least one 0 and one 1."""
    return 0 < int(np.sum(labels)) < len(labels)


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """Return the score threshold that maximises Youden's J on these cases.

    See ``THRESHOLD_RULE``. The result is one of the observed scores.

    Raises
    ------
    ValueError
        If the cases have only one class, or the inputs are invalid.
    """
    labels, scores = check_inputs(labels, scores)
    if not has_both_classes(labels):
        raise ValueError("Youden's J needs positive and negative cases")
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    # thresholds[0] is +inf (nothing positive); it never maximises J above 0.
    j = tpr[1:] - fpr[1:]
    best = int(np.argmax(j))
    return float(thresholds[1:][best])


def _bootstrap_auroc(
    labels: np.ndarray, scores: np.ndarray, resamples: int, seed: int
) -> np.ndarray:
    """Return stratified bootstrap AUROCs by the Mann-Whitney rank formula."""
    rng = np.random.default_rng(seed)
    positives = scores[labels == 1]
    negatives = scores[labels == 0]
    n_pos, n_neg = len(positives), len(negatives)
    pos = positives[rng.integers(0, n_pos, size=(resamples, n_pos))]
    neg = negatives[rng.integers(0, n_neg, size=(resamples, n_neg))]
    # Mid-ranks of each resample give the tie-corrected U statistic.
    ranks = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    u = ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def auroc_with_ci(
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = CI_LEVEL,
) -> dict[str, Any]:
    """Return the AUROC and its percentile bootstrap confidence interval.

    The point estimate is ``sklearn.metrics.roc_auc_score``; the interval is in
    ``CI_RULE``. Stratified resampling keeps both classes in every resample.

    Returns
    -------
    dict
        ``auroc``, ``ci_lower``, ``ci_upper``, ``ci_level``, ``resamples`` and
        ``seed``. All three values are None when the cases have one class.

    Raises
    ------
    ValueError
        If the inputs are invalid or ``resamples`` < 1.
    """
    labels, scores = check_inputs(labels, scores)
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    summary: dict[str, Any] = {
        "auroc": None,
        "ci_lower": None,
        "ci_upper": None,
        "ci_level": level,
        "resamples": resamples,
        "seed": seed,
    }
    if not has_both_classes(labels):
        return summary
    summary["auroc"] = float(roc_auc_score(labels, scores))
    aurocs = _bootstrap_auroc(labels, scores, resamples, seed)
    tail = (1.0 - level) / 2.0 * 100.0
    summary["ci_lower"] = float(np.percentile(aurocs, tail))
    summary["ci_upper"] = float(np.percentile(aurocs, 100.0 - tail))
    return summary


def wilson_interval(successes: int, total: int, level: float = CI_LEVEL) -> list[float]:
    """Return the Wilson score interval of a proportion; [nan, nan] when total is 0."""
    if total == 0:
        return [math.nan, math.nan]
    z = float(norm.ppf(0.5 + level / 2.0))
    p = successes / total
    denominator = 1.0 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = (
        z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    )
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def operating_point(
    labels: np.ndarray, scores: np.ndarray, threshold: float
) -> dict[str, Any]:
    """Return the confusion matrix and rates at ``score >= threshold``.

    Returns
    -------
    dict
        ``threshold``, ``confusion_matrix`` (``tn``, ``fp``, ``fn``, ``tp``),
        ``sensitivity``, ``specificity``, ``ppv``, ``npv``, ``accuracy`` (None
        where the denominator is 0) and a 95 % Wilson interval for each rate in
        ``intervals``.

    Raises
    ------
    ValueError
        If the inputs are invalid.
    """
    labels, scores = check_inputs(labels, scores)
    predicted = scores >= threshold
    tp = int(np.sum(predicted & (labels == 1)))
    fp = int(np.sum(predicted & (labels == 0)))
    fn = int(np.sum(~predicted & (labels == 1)))
    tn = int(np.sum(~predicted & (labels == 0)))
    counts = {
        "sensitivity": (tp, tp + fn),
        "specificity": (tn, tn + fp),
        "ppv": (tp, tp + fp),
        "npv": (tn, tn + fn),
        "accuracy": (tp + tn, len(labels)),
    }
    result: dict[str, Any] = {
        "threshold": float(threshold),
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }
    for name, (numerator, denominator) in counts.items():
        result[name] = _ratio(numerator, denominator)
    result["intervals"] = {
        name: None if denominator == 0 else wilson_interval(numerator, denominator)
        for name, (numerator, denominator) in counts.items()
    }
    return result


def calibration(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """Return the expected calibration error and the reliability-diagram bins.

    The binning is ``ECE_RULE``; scores are clipped to [0, 1] first.

    Returns
    -------
    dict
        ``ece``, ``bins`` (``ECE_BINS``) and ``reliability``: one entry per bin
        with ``lower``, ``upper``, ``n``, ``mean_score`` and ``positive_fraction``
        (None for empty bins).

    Raises
    ------
    ValueError
        If the inputs are invalid or empty.
    """
    labels, scores = check_inputs(labels, scores)
    if len(labels) == 0:
        raise ValueError("calibration needs at least one case")
    clipped = np.clip(scores, 0.0, 1.0)
    index = np.minimum((clipped * ECE_BINS).astype(np.int64), ECE_BINS - 1)
    ece = 0.0
    bins = []
    for b in range(ECE_BINS):
        member = index == b
        n = int(member.sum())
        entry: dict[str, Any] = {
            "lower": b / ECE_BINS,
            "upper": (b + 1) / ECE_BINS,
            "n": n,
            "mean_score": None,
            "positive_fraction": None,
        }
        if n:
            mean_score = float(clipped[member].mean())
            fraction = float(labels[member].mean())
            entry["mean_score"] = mean_score
            entry["positive_fraction"] = fraction
            ece += n / len(labels) * abs(mean_score - fraction)
        bins.append(entry)
    return {"ece": float(ece), "bins": ECE_BINS, "reliability": bins}


@dataclass(frozen=True)
class SubgroupSpec:
    """A subgroup attribute: its report name and the case attribute it reads."""

    name: str
    attribute: str


SUBGROUPS = (
    SubgroupSpec("sex", "sex"),
    SubgroupSpec("age band", "age_band"),
    SubgroupSpec("manufacturer", "manufacturer"),
    SubgroupSpec("view position", "view_position"),
)
AGE_BANDS = ((0, 50, "<50"), (50, 65, "50-64"), (65, 80, "65-79"), (80, 200, ">=80"))


def age_band(age_years: int) -> str:
    """Return the age band label (``AGE_BANDS``) of an age in years.

    Raises
    ------
    ValueError
        If the age is negative or above 199.
    """
    for lower, upper, label in AGE_BANDS:
        if lower <= age_years < upper:
            return label
    raise ValueError(f"age {age_years} is outside 0-199 years")


def subgroup_table(
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    attributes: Mapping[str, Sequence[str]],
) -> list[dict[str, Any]]:
    """Return one row per (attribute, value) with n, positives, AUROC and rates.

    ``attributes`` maps an attribute name to each case's value. The rows of one
    attribute partition the cases, so their ``n`` sum to the number of cases.
    A row whose n is under ``MIN_SUBGROUP_N`` or whose smaller class has fewer
    than ``MIN_SUBGROUP_CLASS`` cases gets ``auroc`` None and a ``note``.

    Raises
    ------
    ValueError
        If the inputs are invalid or an attribute has another length.
    """
    labels, scores = check_inputs(labels, scores)
    rows = []
    for attribute, values in attributes.items():
        values = np.asarray([str(value) for value in values])
        if values.shape != labels.shape:
            raise ValueError(
                f"subgroup attribute {attribute!r} has {len(values)} values for "
                f"{len(labels)} cases"
            )
        for value in sorted(set(values.tolist())):
            member = values == value
            sub_labels = labels[member]
            sub_scores = scores[member]
            n = int(member.sum())
            positives = int(sub_labels.sum())
            smaller_class = min(positives, n - positives)
            point = operating_point(sub_labels, sub_scores, threshold)
            row: dict[str, Any] = {
                "attribute": attribute,
                "value": value,
                "n": n,
                "positives": positives,
                "auroc": None,
                "sensitivity": point["sensitivity"],
                "specificity": point["specificity"],
                "note": None,
            }
            if n < MIN_SUBGROUP_N or smaller_class < MIN_SUBGROUP_CLASS:
                row["note"] = (
                    f"n too small for AUROC (n={n}, positives={positives}; needs "
                    f"n >= {MIN_SUBGROUP_N} and >= {MIN_SUBGROUP_CLASS} per class)"
                )
            else:
                row["auroc"] = float(roc_auc_score(sub_labels, sub_scores))
            rows.append(row)
    return rows
