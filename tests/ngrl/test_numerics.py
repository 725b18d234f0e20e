"""Hard numbers: rank-deficient and badly scaled factors, failing eigh, NaN and inf."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ngrl.curvature import base
from ngrl.curvature.base import symmetric_eigh
from ngrl.fisher import layer_indices
from ngrl.optim import KFAC
from tests.helpers.oracle import (
    capture_batch,
    damped_solve,
    flat_parameters,
    layer_gradient,
    oracle_block,
    sample_classes,
)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("scale", [1.0, 1e6])
def test_rank_deficient_and_badly_scaled_factors_give_the_exact_step(scale: float) -> None:
    """Batch of one: A and G have rank 1. ``scale`` spreads the input over 1e-6..1e6, so
    the factor A spans a dynamic range of about 1e12 (and more, with the rank deficiency)."""
    model = nn.Linear(4, 3)
    x = torch.tensor([[1e-6, 1.0, 3.0, 1.0]]) * torch.tensor([1.0, 1.0, 1.0, scale])
    targets = sample_classes(model(x))
    opt = KFAC(model, lr=0.1, damping=1e-3, kl_clip=None, momentum=0.0)
    capture_batch(opt, model, x, targets)
    exact = oracle_block(model, x, targets, "")
    F.cross_entropy(model(x), torch.tensor([2])).backward()
    grad = layer_gradient(model, "")
    before = flat_parameters(model)[layer_indices(model, "")]
    opt.step()
    after = flat_parameters(model)[layer_indices(model, "")]
    assert torch.isfinite(after).all()
    torch.testing.assert_close(after - before, -0.1 * damped_solve(exact, grad, 1e-3))


def test_nan_gradient_skips_the_step_and_changes_nothing() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = KFAC(model, lr=0.1)
    x = torch.randn(6, 3)
    for _ in range(2):  # builds factors and a momentum buffer
        capture_batch(opt, model, x, sample_classes(model(x)))
        F.cross_entropy(model(x), torch.zeros(6, dtype=torch.long)).backward()
        opt.step()
        opt.zero_grad()
    params = flat_parameters(model)
    state = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    steps = opt.steps
    F.cross_entropy(model(x), torch.zeros(6, dtype=torch.long)).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradients"):
        opt.step()
    assert torch.equal(flat_parameters(model), params)
    assert opt.steps == steps
    for key, value in opt.state_dict()["state"][0].items():
        assert torch.equal(value, state[key])


def test_non_finite_statistics_are_dropped_and_factors_kept() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = KFAC(model)
    x = torch.randn(6, 3)
    capture_batch(opt, model, x, sample_classes(model(x)))
    a_factor = opt.blocks["0"].a_factor.clone()
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite curvature statistics"):
        with opt.capture():
            model(bad).sum().backward()
    assert torch.equal(opt.blocks["0"].a_factor, a_factor)


def test_an_exception_inside_capture_leaves_no_half_batch() -> None:
    model = nn.Linear(3, 2)
    opt = KFAC(model)
    with pytest.raises(RuntimeError, match="boom"):
        with opt.capture():
            model(torch.randn(4, 3)).sum().backward()
            raise RuntimeError("boom")
    assert not opt.blocks[""].initialized
    with opt.capture():
        model(torch.randn(4, 3)).sum().backward()
    assert opt.blocks[""].initialized


def test_eigh_failure_is_retried_with_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_eigh = torch.linalg.eigh

    def flaky(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(matrix.dtype)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("failed to converge")
        return real_eigh(matrix)

    monkeypatch.setattr(base.torch.linalg, "eigh", flaky)
    factor = torch.randn(5, 3)
    factor = factor @ factor.T  # rank 3 of 5
    values, vectors = symmetric_eigh(factor)
    assert len(calls) == 2 and calls[1] == torch.float64
    assert (values >= 0).all()
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, factor, atol=1e-4, rtol=0)


def test_eigendecomposition_of_a_large_factor_stays_in_its_dtype() -> None:
    factor = torch.eye(6)
    values, vectors = symmetric_eigh(factor, float64_max_dim=4)
    assert values.dtype == vectors.dtype == torch.float32
