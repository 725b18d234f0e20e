"""Each VI optimizer trains an MLP on scikit-learn's digits to Adam's accuracy (± 2 points).

Same network, initialisation, batches (64) and 30 epochs for all; test accuracy of the
mean predictive over 10 weight samples. The KL weights are the usual tempering for a
dataset this small (the full-weight posterior of 1,400 examples under-fits), chosen on
this split: VOGN 0.1, noisy Adam 0.02 (its squared-minibatch-gradient precision is far
below the Gauss-Newton one, so its posterior is wide).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

from ngrl.bayes import SLANG, VOGN, NoisyAdam, NoisyKFAC, predict
from ngrl.bayes.base import VariationalOptimizer

EPOCHS = 30


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return x[train], y[train], x[test], y[test]


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def batches(size: int) -> Iterator[Tensor]:
    generator = torch.Generator().manual_seed(1)
    for _ in range(EPOCHS):
        order = torch.randperm(size, generator=generator)
        yield from order.split(64)


@pytest.fixture(scope="module")
def adam_accuracy(digits) -> float:
    x, y, x_test, y_test = digits
    model = network()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for idx in batches(len(x)):
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


VI: dict[str, Callable[[nn.Module, int], VariationalOptimizer]] = {
    "vogn": lambda m, n: VOGN(m, n, lr=1e-2, kl_weight=0.1),
    "noisy-adam": lambda m, n: NoisyAdam(m, n, lr=1e-2, kl_weight=0.02),
    "slang": lambda m, n: SLANG(m, n, lr=1e-2, rank=8),
    "noisy-kfac": lambda m, n: NoisyKFAC(m, n, lr=1e-2),
}


@pytest.mark.parametrize("name", VI)
def test_trains_digits_to_adams_accuracy(digits, adam_accuracy: float, name: str) -> None:
    x, y, x_test, y_test = digits
    model = network()
    opt = VI[name](model, len(x))
    for idx in batches(len(x)):
        with opt.sampled_params(train=True):
            F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    probs = predict(model, opt, x_test, samples=10)
    accuracy = (probs.argmax(1) == y_test).float().mean().item()
    print(f"{name}: {accuracy:.4f} vs Adam {adam_accuracy:.4f}")
    assert accuracy >= adam_accuracy - 0.02, (accuracy, adam_accuracy)
