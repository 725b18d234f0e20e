"""The calibration metrics against hand-computed values and against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss, roc_auc_score

from ngrl.bayes import calibration as cal

# Four binary predictions worked out by hand below:
# confidences 0.9, 0.6, 0.7, 0.8; correct, wrong, correct, wrong.
PROBS = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
LABELS = np.array([0, 1, 1, 0])


def random_predictions(n: int = 2000, k: int = 5, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * 2.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(k, p=p) for p in probs])
    return probs, labels


def test_hand_computed_values() -> None:
    assert cal.accuracy(PROBS, LABELS) == 0.5
    assert cal.nll(PROBS, LABELS) == pytest.approx(-np.log([0.9, 0.4, 0.7, 0.2]).mean())
    # (0.01 + 0.01) + (0.36 + 0.36) + (0.09 + 0.09) + (0.64 + 0.64), over 4.
    assert cal.brier(PROBS, LABELS) == pytest.approx(0.55)
    # Ten bins: one prediction per bin, gaps 0.1, 0.6, 0.3, 0.8.
    assert cal.ece(PROBS, LABELS, bins=10) == pytest.approx(0.45)
    assert cal.mce(PROBS, LABELS, bins=10) == pytest.approx(0.8)
    # Two bins: all four in [0.5, 1]: accuracy 0.5 against mean confidence 0.75.
    assert cal.ece(PROBS, LABELS, bins=2) == pytest.approx(0.25)
    # Equal mass, two bins: {0.6 ✗, 0.7 ✓} gap 0.15 and {0.8 ✗, 0.9 ✓} gap 0.35.
    assert cal.adaptive_ece(PROBS, LABELS, bins=2) == pytest.approx(0.25)
    # Correct (0.9, 0.7) above wrong (0.6, 0.8) in 3 of 4 pairs.
    assert cal.auroc_misclassification(PROBS, LABELS) == pytest.approx(0.75)
    # Accepted by confidence: ✓ ✗ ✓ ✗ → risks 0, 1/2, 1/3, 2/4.
    assert cal.aurc(PROBS, LABELS) == pytest.approx((0 + 1 / 2 + 1 / 3 + 2 / 4) / 4)


def test_confidence_of_one_falls_in_the_last_bin() -> None:
    probs = np.array([[1.0, 0.0], [1.0, 0.0]])
    diagram = cal.reliability(probs, np.array([0, 1]), bins=15)
    assert len(diagram.count) == 15
    assert diagram.count[-1] == 2 and diagram.count[:-1].sum() == 0
    assert cal.ece(probs, np.array([0, 1]), bins=15) == pytest.approx(0.5)
    assert cal.ece(probs, np.array([0, 0]), bins=20) == 0.0


def test_bin_edges_follow_floor() -> None:
    # 0.6 sits on an edge of 5 bins: it opens the bin [0.6, 0.8).
    diagram = cal.reliability(np.array([[0.6, 0.4]]), np.array([0]), bins=5)
    assert diagram.count.tolist() == [0, 0, 0, 1, 0]
    assert np.isnan(diagram.accuracy[0]) and diagram.accuracy[3] == 1.0


def test_agrees_with_scikit_learn() -> None:
    probs, labels = random_predictions()
    assert cal.accuracy(probs, labels) == pytest.approx(accuracy_score(labels, probs.argmax(1)))
    assert cal.nll(probs, labels) == pytest.approx(log_loss(labels, probs), rel=1e-9)
    assert cal.brier(probs, labels) == pytest.approx(brier_score_loss(labels, probs), rel=1e-9)
    correct = probs.argmax(1) == labels
    assert cal.auroc_misclassification(probs, labels) == pytest.approx(
        roc_auc_score(correct, probs.max(1))
    )


def test_reliability_agrees_with_scikit_learn_calibration_curve() -> None:
    # Binary predictions with p(1) ≥ 0.5: the top label is class 1, so the top-label
    # reliability diagram is scikit-learn's calibration curve of p(1).
    rng = np.random.default_rng(1)
    p1 = rng.uniform(0.5, 1.0, size=3000)
    labels = (rng.uniform(size=3000) < p1**2).astype(int)
    probs = np.stack([1 - p1, p1], axis=1)
    diagram = cal.reliability(probs, labels, bins=20)
    prob_true, prob_pred = calibration_curve(labels, p1, n_bins=20, strategy="uniform")
    filled = diagram.count > 0
    np.testing.assert_allclose(diagram.accuracy[filled], prob_true)
    np.testing.assert_allclose(diagram.confidence[filled], prob_pred)


def test_auroc_counts_ties_as_half_like_scikit_learn() -> None:
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 5, size=400).astype(float)  # many ties
    positives = rng.uniform(size=400) < 0.3 + 0.1 * scores
    assert cal.auroc(scores, positives) == pytest.approx(roc_auc_score(positives, scores))
    assert cal.auroc([0.5, 0.5], [1, 0]) == 0.5
    assert math.isnan(cal.auroc([0.1, 0.2], [1, 1]))


def test_auroc_ood_by_entropy() -> None:
    confident = np.array([[0.95, 0.05], [0.9, 0.1]])
    uniform = np.array([[0.5, 0.5], [0.6, 0.4]])
    assert cal.auroc_ood(confident, uniform) == 1.0
    assert cal.auroc_ood(uniform, confident) == 0.0
    np.testing.assert_allclose(cal.predictive_entropy(uniform[:1]), [math.log(2)])


def test_aurc_ignores_the_order_inside_ties() -> None:
    probs = np.array([[0.8, 0.2], [0.8, 0.2], [0.6, 0.4]])
    first = cal.aurc(probs, np.array([0, 1, 0]))
    second = cal.aurc(probs, np.array([1, 0, 0]))
    # The tied pair enters together: risks 1/2, 1/2 then 1/3.
    assert first == second == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)
    # A perfect ranking: all mistakes below all correct predictions.
    assert cal.aurc(np.array([[0.9, 0.1], [0.7, 0.3]]), np.array([0, 1])) == pytest.approx(0.25)


def test_regression_metrics() -> None:
    # Targets 0.5σ, 0.7σ, 1.7σ and 2σ from the mean: z(50%) = 0.674, z(90%) = 1.645,
    # z(95%) = 1.960.
    sigma = 2.0
    mean = np.array([1.0, -1.0, 0.0, 3.0])
    targets = mean + sigma * np.array([0.5, -0.7, 1.7, 2.0])
    variance = np.full(4, sigma**2)
    metrics = cal.regression_metrics(mean, variance, targets)
    assert metrics["coverage_50"] == 0.25
    assert metrics["coverage_90"] == 0.5
    assert metrics["coverage_95"] == 0.75
    assert metrics["rmse"] == pytest.approx(sigma * math.sqrt((0.25 + 0.49 + 2.89 + 4) / 4))
    expected = 0.5 * math.log(2 * math.pi * sigma**2) + (0.25 + 0.49 + 2.89 + 4) / 8
    assert metrics["nll"] == pytest.approx(expected)
    torch_nll = torch.nn.GaussianNLLLoss(full=True)(
        torch.tensor(mean), torch.tensor(targets), torch.tensor(variance)
    )
    assert metrics["nll"] == pytest.approx(torch_nll.item())


def test_classification_metrics_has_every_key_and_takes_tensors() -> None:
    probs, labels = random_predictions(200)
    metrics = cal.classification_metrics(torch.tensor(probs), torch.tensor(labels), probs[:50])
    for b in (15, 20):
        assert {f"ece_{b}", f"mce_{b}", f"adaptive_ece_{b}"} <= metrics.keys()
    assert {"accuracy", "nll", "brier", "auroc_misclassification", "aurc", "auroc_ood"} <= (
        metrics.keys()
    )
    assert all(isinstance(v, float) for v in metrics.values())


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: cal.ece(PROBS, LABELS, bins=0), "bins"),
        (lambda: cal.nll(PROBS, np.array([0, 1, 2, 0])), "labels must be integers"),
        (lambda: cal.nll(PROBS[:3], LABELS), "must match"),
        (lambda: cal.brier(PROBS * 2, LABELS), "summing to 1"),
        (lambda: cal.accuracy(np.full((1, 2), np.nan), [0]), "non-finite"),
        (lambda: cal.coverage([0.0], [1.0], [0.0], level=1.5), "level"),
        (lambda: cal.gaussian_nll([0.0], [0.0], [0.0]), "variance must be positive"),
    ],
)
def test_bad_input_names_the_problem(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
