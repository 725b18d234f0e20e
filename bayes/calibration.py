"""Metrics of predictive uncertainty: can a model's confidence be trusted?

Classification metrics take predictive probabilities ``probs`` of shape ``(N, K)`` (rows
sum to one) and integer ``labels`` of shape ``(N,)``; regression metrics take a Gaussian
predictive ``(mean, variance)`` and targets. Inputs may be NumPy arrays or tensors; every
metric returns a Python float (or, for the reliability diagram, arrays).

Conventions (ECE as Naeini et al. 2015 and Guo et al. 2017 define it):

* Calibration is **top-label**: the confidence of a prediction is ``max_k p_k`` and it is
  correct when ``argmax_k p_k`` is the label, for binary problems too.
* Equal-width bins over ``[0, 1]``: bin ``b = min(B − 1, ⌊conf·B⌋)``, so a confidence of
  exactly 1.0 falls in the last bin, never in a phantom ``(B+1)``-th one.
  ``ECE = Σ_b (n_b/N)·|acc_b − conf_b|`` and ``MCE = max_b |acc_b − conf_b|`` over
  non-empty bins (Naeini et al. 2015; Guo et al. 2017).
* Adaptive ECE uses equal-mass bins: the predictions sorted by confidence and split into
  ``B`` groups whose sizes differ by at most one (Nixon et al. 2019).
* NLL is the mean of ``−log p_y`` with ``p_y`` clipped below at ``1e-12`` (a single
  zero-probability label would otherwise make it infinite); Brier is the mean of
  ``Σ_k (p_k − 1[k = y])²``, the multi-class form (twice the binary ``(p − y)²``).
* AURC is the area under the risk–coverage curve of selective prediction (Geifman et al.
  2019): predictions are accepted in order of decreasing confidence and the risk at each
  coverage is the error rate of the accepted ones. Tied confidences are accepted together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from ngrl.optim.hyperparams import check_integer

__all__ = [
    "ReliabilityDiagram",
    "accuracy",
    "adaptive_ece",
    "aurc",
    "auroc",
    "auroc_misclassification",
    "auroc_ood",
    "brier",
    "classification_metrics",
    "coverage",
    "ece",
    "gaussian_nll",
    "mce",
    "nll",
    "predictive_entropy",
    "regression_metrics",
    "reliability",
    "rmse",
]

PROBABILITY_FLOOR = 1e-12


def _array(values: Any, name: str, ndim: int) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains non-finite values")
    return array


def _classification(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _array(probs, "probs", 2)
    y = _array(labels, "labels", 1)
    if len(p) != len(y) or len(y) == 0:
        raise ValueError(f"probs ({len(p)} rows) and labels ({len(y)}) must match and be non-empty")
    if np.any(y != np.round(y)) or y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must be integers in [0, {p.shape[1] - 1}]")
    if np.any(p < 0) or not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise ValueError("probs must be non-negative with rows summing to 1")
    return p, y.astype(np.int64)


def _confidence_and_correct(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p, y = _classification(probs, labels)
    return p.max(1), (p.argmax(1) == y).astype(np.float64)


def _check_bins(bins: int) -> None:
    check_integer("bins", bins, 1)


def accuracy(probs: Any, labels: Any) -> float:
    """The fraction of examples whose most probable class is the label."""
    return float(_confidence_and_correct(probs, labels)[1].mean())


def nll(probs: Any, labels: Any) -> float:
    """The mean negative log-likelihood ``−log p_y`` (natural log)."""
    p, y = _classification(probs, labels)
    return float(-np.log(np.maximum(p[np.arange(len(y)), y], PROBABILITY_FLOOR)).mean())


def brier(probs: Any, labels: Any) -> float:
    """The multi-class Brier score ``mean_n Σ_k (p_nk − 1[k = y_n])²``."""
    p, y = _classification(probs, labels)
    onehot = np.eye(p.shape[1])[y]
    return float(((p - onehot) ** 2).sum(1).mean())


@dataclass(frozen=True)
class ReliabilityDiagram:
    """Equal-width top-label bins: per bin the mean confidence, accuracy and count.

    Empty bins have ``count == 0`` and NaN confidence and accuracy.
    """

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray

    @property
    def gaps(self) -> np.ndarray:
        """``|acc_b − conf_b|`` per bin (NaN for empty bins)."""
        return np.abs(self.accuracy - self.confidence)


def reliability(probs: Any, labels: Any, bins: int = 15) -> ReliabilityDiagram:
    """The data of a reliability diagram with ``bins`` equal-width bins over ``[0, 1]``."""
    _check_bins(bins)
    confidence, correct = _confidence_and_correct(probs, labels)
    index = np.minimum(bins - 1, np.floor(confidence * bins).astype(np.int64))
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, confidence, minlength=bins) / count
        mean_acc = np.bincount(index, correct, minlength=bins) / count
    return ReliabilityDiagram(np.linspace(0.0, 1.0, bins + 1), mean_conf, mean_acc, count)


def ece(probs: Any, labels: Any, bins: int = 15) -> float:
    """Expected calibration error over ``bins`` equal-width top-label bins."""
    diagram = reliability(probs, labels, bins)
    filled = diagram.count > 0
    return float((diagram.count[filled] * diagram.gaps[filled]).sum() / diagram.count.sum())


def mce(probs: Any, labels: Any, bins: int = 15) -> float:
    """Maximum calibration error: the largest gap over the non-empty equal-width bins."""
    diagram = reliability(probs, labels, bins)
    return float(diagram.gaps[diagram.count > 0].max())


def adaptive_ece(probs: Any, labels: Any, bins: int = 15) -> float:
    """ECE over ``bins`` equal-mass bins of the sorted confidences."""
    _check_bins(bins)
    confidence, correct = _confidence_and_correct(probs, labels)
    order = np.argsort(confidence, kind="stable")
    total = 0.0
    for group in np.array_split(order, min(bins, len(order))):
        total += len(group) * abs(correct[group].mean() - confidence[group].mean())
    return float(total / len(order))


def auroc(scores: Any, positives: Any) -> float:
    """The area under the ROC curve: P(score of a positive > score of a negative).

    Ties count one half (scikit-learn's ``roc_auc_score``); NaN when only one class is
    present (no mistakes at all, say), where the area is undefined.
    """
    s = _array(scores, "scores", 1)
    is_positive = _array(positives, "positives", 1).astype(bool)
    if len(s) != len(is_positive):
        raise ValueError(f"scores ({len(s)}) and positives ({len(is_positive)}) must match")
    if is_positive.all() or not is_positive.any():
        return float("nan")
    return float(roc_auc_score(is_positive, s))


def auroc_misclassification(probs: Any, labels: Any) -> float:
    """How well the confidence separates correct predictions (positives) from mistakes."""
    confidence, correct = _confidence_and_correct(probs, labels)
    return auroc(confidence, correct)


def predictive_entropy(probs: Any) -> np.ndarray:
    """``−Σ_k p_k log p_k`` per example (nats)."""
    p = _array(probs, "probs", 2)
    return -(p * np.log(np.maximum(p, PROBABILITY_FLOOR))).sum(1)


def auroc_ood(probs_in: Any, probs_out: Any) -> float:
    """How well the predictive entropy separates out-of-distribution inputs (positives)."""
    entropy = np.concatenate([predictive_entropy(probs_in), predictive_entropy(probs_out)])
    is_out = np.concatenate([np.zeros(len(probs_in)), np.ones(len(probs_out))])
    return auroc(entropy, is_out)


def aurc(probs: Any, labels: Any) -> float:
    """Area under the risk–coverage curve (lower is better; 0 for a perfect ranking).

    The mean over coverages ``k/N`` of the error rate of the ``k`` most confident
    predictions; a group of tied confidences enters at once, so each of its coverages
    takes the risk after the whole group.
    """
    confidence, correct = _confidence_and_correct(probs, labels)
    order = np.argsort(-confidence, kind="stable")
    errors = np.cumsum(1.0 - correct[order])
    accepted = np.arange(1, len(order) + 1)
    risk = errors / accepted
    # The last index of each tied group carries the group's risk to all its members.
    sorted_conf = confidence[order]
    group_end = np.r_[np.flatnonzero(sorted_conf[1:] != sorted_conf[:-1]), len(order) - 1]
    group_of = np.searchsorted(group_end, np.arange(len(order)))
    return float(risk[group_end[group_of]].mean())


def _regression(mean: Any, variance: Any, targets: Any) -> tuple[np.ndarray, ...]:
    mu = _array(mean, "mean", 1)
    var = _array(variance, "variance", 1)
    y = _array(targets, "targets", 1)
    if not len(mu) == len(var) == len(y) or len(y) == 0:
        raise ValueError(
            f"mean ({len(mu)}), variance ({len(var)}) and targets ({len(y)}) must match"
        )
    if np.any(var <= 0):
        raise ValueError("variance must be positive")
    return mu, var, y


def gaussian_nll(mean: Any, variance: Any, targets: Any) -> float:
    """Mean ``½ log(2π σ²) + (y − μ)² / (2σ²)`` of a Gaussian predictive."""
    mu, var, y = _regression(mean, variance, targets)
    return float((0.5 * np.log(2 * np.pi * var) + (y - mu) ** 2 / (2 * var)).mean())


def rmse(mean: Any, targets: Any) -> float:
    """Root mean squared error of the predictive mean."""
    mu = _array(mean, "mean", 1)
    y = _array(targets, "targets", 1)
    if len(mu) != len(y) or len(y) == 0:
        raise ValueError(f"mean ({len(mu)}) and targets ({len(y)}) must match")
    return float(np.sqrt(((mu - y) ** 2).mean()))


def coverage(mean: Any, variance: Any, targets: Any, level: float) -> float:
    """The fraction of targets inside the central ``level`` interval ``μ ± z σ``."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"Invalid level value: {level} (must be in (0, 1))")
    mu, var, y = _regression(mean, variance, targets)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return float((np.abs(y - mu) <= z * np.sqrt(var)).mean())


def classification_metrics(
    probs: Any,
    labels: Any,
    probs_ood: Any | None = None,
    bins: Sequence[int] = (15, 20),
) -> dict[str, float]:
    """Every classification metric under its report name (``ece_15``, ``auroc_ood``, ...)."""
    metrics = {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
    }
    for b in bins:
        metrics[f"ece_{b}"] = ece(probs, labels, b)
        metrics[f"mce_{b}"] = mce(probs, labels, b)
        metrics[f"adaptive_ece_{b}"] = adaptive_ece(probs, labels, b)
    metrics["auroc_misclassification"] = auroc_misclassification(probs, labels)
    metrics["aurc"] = aurc(probs, labels)
    if probs_ood is not None:
        metrics["auroc_ood"] = auroc_ood(probs, probs_ood)
    return metrics


COVERAGE_LEVELS = (0.5, 0.9, 0.95)


def regression_metrics(mean: Any, variance: Any, targets: Any) -> dict[str, float]:
    """Gaussian NLL, RMSE and the coverage of the 50/90/95% intervals."""
    metrics = {"nll": gaussian_nll(mean, variance, targets), "rmse": rmse(mean, targets)}
    for level in COVERAGE_LEVELS:
        metrics[f"coverage_{round(level * 100)}"] = coverage(mean, variance, targets, level)
    return metrics
