"""Conjugate gradient and Fisher-vector products against dense exact answers (float64)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Categorical, Normal, kl_divergence

from ngrl.fisher import exact_fisher
from ngrl.optim import conjugate_gradient, fisher_vector_product


def test_conjugate_gradient_is_exact_after_dimension_many_steps(float64: None) -> None:
    root = torch.randn(12, 12)
    matrix = root @ root.T + 0.1 * torch.eye(12)
    b = torch.randn(12)
    x = conjugate_gradient(lambda v: matrix @ v, b, max_iterations=12, tolerance=0.0)
    torch.testing.assert_close(x, torch.linalg.solve(matrix, b), rtol=1e-8, atol=1e-8)


def test_conjugate_gradient_stops_at_the_iteration_budget(float64: None) -> None:
    matrix = torch.diag(torch.arange(1.0, 11.0))
    calls = []

    def matvec(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return matrix @ v

    x = conjugate_gradient(matvec, torch.ones(10), max_iterations=3, tolerance=0.0)
    assert len(calls) == 3
    assert not torch.allclose(x, 1.0 / torch.arange(1.0, 11.0))


def test_kl_hessian_product_is_the_exact_fisher_of_a_categorical_policy(float64: None) -> None:
    policy = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    obs = torch.randn(7, 3)
    params = list(policy.parameters())
    logits = policy(obs)
    old = Categorical(logits=logits.detach())
    kl = kl_divergence(old, Categorical(logits=logits)).mean()
    product = fisher_vector_product(kl, params, damping=0.1)
    fisher = exact_fisher(policy, obs, "categorical")
    for _ in range(3):
        v = torch.randn(fisher.shape[0])
        torch.testing.assert_close(product(v), fisher @ v + 0.1 * v)


def test_kl_hessian_product_is_the_exact_fisher_of_a_unit_gaussian_policy(float64: None) -> None:
    policy = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2))
    obs = torch.randn(6, 2)
    params = list(policy.parameters())
    mean = policy(obs)
    old = Normal(mean.detach(), torch.ones_like(mean))
    kl = kl_divergence(old, Normal(mean, torch.ones_like(mean))).sum(-1).mean()
    product = fisher_vector_product(kl, params)
    v = torch.randn(sum(p.numel() for p in params))
    torch.testing.assert_close(product(v), exact_fisher(policy, obs, "gaussian") @ v)
