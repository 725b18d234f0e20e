"""The VI optimizers against exact answers (float64, models of a few parameters).

Bayesian logistic regression: the posterior is narrow, so the VOGN and SLANG fixed points
are evaluated at the mean (the MAP estimate). The data are 2,000 examples standing for a
dataset of ``N = 10⁶`` (each repeated 500 times): the batch-mean loss is the same, and the
posterior width ``σ ≈ 0.003`` makes the gap between the variational mean and the MAP
estimate (``O(σ²)``) and the Monte-Carlo jitter of the mean (``≈ σ·sqrt(lr/(2·samples))``
under the 1/t step sizes) both well under the 1e-3 tolerance.

Precisions are compared with rtol 1e-3: ``s`` averages ``ĥ`` at samples ``θ ~ q`` rather
than at the mean, a relative bias ``O(σ²)`` (~1e-5 here), and its average over the last
~100 steps (β₂ = 0.99) of 2 samples each has relative noise ~1e-4 (measured: 3e-5).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngrl.bayes import SLANG, VOGN, NoisyAdam, NoisyKFAC
from ngrl.bayes.base import VariationalOptimizer
from ngrl.fisher import empirical_fisher, layer_indices, per_example_gradients

DATASET_SIZE = 1_000_000.0
PRIOR = 2e4  # λ/N = 0.02 against a Gauss-Newton diagonal of ~0.1: the prior matters


def bce_sum(output: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(output, target, reduction="sum")


@pytest.fixture
def logistic(float64: None) -> tuple[Tensor, Tensor, nn.Linear]:
    """Data and the MAP model of ``mean BCE + (λ/2N)‖θ‖²``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 3, generator=generator)
    logits = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
    y = torch.bernoulli(torch.sigmoid(logits), generator=generator)[:, None]
    model = nn.Linear(3, 1)
    lbfgs = torch.optim.LBFGS(
        model.parameters(),
        max_iter=200,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )

    def objective() -> Tensor:
        lbfgs.zero_grad()
        penalty = sum(p.square().sum() for p in model.parameters())
        loss = (
            F.binary_cross_entropy_with_logits(model(x), y) + PRIOR / (2 * DATASET_SIZE) * penalty
        )
        loss.backward()
        return loss

    lbfgs.step(objective)
    return x, y, model


def train_to_convergence(opt: VariationalOptimizer, model: nn.Module, x: Tensor, y: Tensor) -> None:
    def closure() -> Tensor:
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        return loss

    for step in range(1000):
        opt.param_groups[0]["lr"] = min(0.5, 20.0 / (step + 1))  # Robbins-Monro decay
        opt.step(closure)


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_vogn_reaches_the_map_and_its_precision_fixed_point(logistic) -> None:
    x, y, map_model = logistic
    model = nn.Linear(3, 1)
    opt = VOGN(model, DATASET_SIZE, lr=0.5, prior_precision=PRIOR, mc_samples=2, betas=(0.9, 0.99))
    train_to_convergence(opt, model, x, y)
    posterior = opt.posterior()
    grads = per_example_gradients(map_model, bce_sum, x, y)
    expected = PRIOR + DATASET_SIZE * grads.square().mean(0)
    torch.testing.assert_close(posterior.mean, flat(map_model), atol=1e-3, rtol=0)
    torch.testing.assert_close(posterior.diagonal, expected, rtol=1e-3, atol=0)


def test_full_rank_slang_reaches_the_full_precision_fixed_point(logistic) -> None:
    x, y, map_model = logistic
    model = nn.Linear(3, 1)
    opt = SLANG(
        model, DATASET_SIZE, lr=0.5, prior_precision=PRIOR, mc_samples=2, rank=4, betas=(0.9, 0.99)
    )
    train_to_convergence(opt, model, x, y)
    posterior = opt.posterior()
    expected = PRIOR * torch.eye(4) + DATASET_SIZE * empirical_fisher(map_model, bce_sum, x, y)
    torch.testing.assert_close(posterior.mean, flat(map_model), atol=1e-3, rtol=0)
    precision = posterior.precision()
    error = torch.linalg.matrix_norm(precision - expected) / torch.linalg.matrix_norm(expected)
    assert error < 1e-3


# --- one step from a posterior so sharp that samples equal the mean --------------------
# hess_init = 1e24 makes σ ≈ 1e-12, so the first step's statistics are those at the mean,
# which the oracle computes exactly.
SHARP = 1e24


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, kernel_size=2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4))


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def inputs_for(model: nn.Module, n: int = 24) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(3)
    shape = (n, 2, 3, 3) if isinstance(model[0], nn.Conv2d) else (n, 4)
    x = torch.randn(shape, generator=generator)
    classes = model(x).shape[-1]
    return x, torch.randint(0, classes, (n,), generator=generator)


def ce_sum(output: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(output, target, reduction="sum")


def one_step(opt: VariationalOptimizer, model: nn.Module, x: Tensor, y: Tensor) -> None:
    with opt.sampled_params(train=True):
        F.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("make_model", [small_mlp, small_cnn], ids=["mlp", "cnn"])
def test_vogn_precision_is_the_per_example_squared_gradient_diagonal(float64, make_model) -> None:
    model = make_model()
    x, y = inputs_for(model)
    grads = per_example_gradients(model, ce_sum, x, y)
    opt = VOGN(model, 100.0, lr=0.0, prior_precision=0.5, hess_init=SHARP)
    one_step(opt, model, x, y)  # the first average takes the estimate as is
    expected = 0.5 + 100.0 * grads.square().mean(0)
    torch.testing.assert_close(opt.posterior().diagonal, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("make_model", [small_mlp, small_cnn], ids=["mlp", "cnn"])
def test_slang_keeps_the_top_eigenspace_and_the_whole_diagonal(float64, make_model) -> None:
    model = make_model()
    x, y = inputs_for(model)
    fisher = 100.0 * empirical_fisher(model, ce_sum, x, y)
    rank = 3
    # 24 examples and rank 3 against 43 (MLP) and 79 (CNN) parameters: the Gram path.
    opt = SLANG(model, 100.0, lr=0.0, prior_precision=0.5, rank=rank, hess_init=SHARP)
    one_step(opt, model, x, y)
    posterior = opt.posterior()
    values, vectors = torch.linalg.eigh(fisher)
    top = (vectors[:, -rank:] * values[-rank:]) @ vectors[:, -rank:].T
    low_rank = posterior.factor @ posterior.factor.T
    torch.testing.assert_close(low_rank, top, rtol=1e-6, atol=1e-8 * float(values[-1]))
    # The mass the truncation drops from the diagonal moves into d.
    torch.testing.assert_close(
        posterior.precision().diagonal(), 0.5 + fisher.diagonal(), rtol=1e-6, atol=1e-10
    )


@pytest.mark.parametrize("make_model", [small_mlp, small_cnn], ids=["mlp", "cnn"])
def test_slang_gram_path_equals_the_thin_svd_of_the_blend(float64, make_model) -> None:
    """The ``(L+M)``-square Gram route to ``W V_L`` against the SVD of ``W`` itself, after
    two steps of two samples (a non-zero ``U``, examples from two samples)."""
    model = make_model()
    x, y = inputs_for(model, n=8)
    opt = SLANG(model, 100.0, lr=0.1, prior_precision=0.5, rank=3, mc_samples=2)
    for _ in range(2):
        for _ in range(2):
            with opt.sampled_params(train=True):
                F.cross_entropy(model(x), y).backward()
        if opt.steps == 0:
            opt.step()
    factor = opt.vi_state["factor"]
    layers = opt._examples_by_layer()
    assert factor.abs().max() > 0 and next(iter(layers.values())).examples == 16
    gram = opt._top_of_gram(factor, layers, keep=0.8, scale=3.0)
    dense = opt._top_of_dense_blend(factor, layers, keep=0.8, scale=3.0)
    torch.testing.assert_close(gram @ gram.T, dense @ dense.T, rtol=1e-8, atol=1e-10)


def natural_step(opt: VariationalOptimizer, mean: Tensor, grad: Tensor) -> Tensor:
    """``−lr·N·Λ⁻¹(ĝ + λ̃μ)``: the first step of every optimizer with a Gauss-Newton
    precision (the bias-corrected momentum starts at its first value)."""
    size = opt.effective_size
    target = grad + opt.prior_damping * mean
    precision = opt.posterior().precision()
    return -opt.param_groups[0]["lr"] * size * torch.linalg.solve(precision, target)


def make_vogn(model: nn.Module) -> VariationalOptimizer:
    return VOGN(model, 50.0, lr=0.3, prior_precision=2.0, hess_init=SHARP)


def make_slang(model: nn.Module) -> VariationalOptimizer:
    return SLANG(model, 50.0, lr=0.3, prior_precision=2.0, rank=4, hess_init=SHARP)


def make_noisy_kfac(model: nn.Module) -> VariationalOptimizer:
    return NoisyKFAC(model, 50.0, lr=0.3, prior_precision=2.0, damping=1e-2, hess_init=SHARP)


@pytest.mark.parametrize("make_model", [small_mlp, small_cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize(
    "make_opt", [make_vogn, make_slang, make_noisy_kfac], ids=["vogn", "slang", "noisy-kfac"]
)
def test_the_mean_step_is_the_natural_gradient_of_the_posterior(
    float64, make_model: Callable[[], nn.Module], make_opt
) -> None:
    model = make_model()
    x, y = inputs_for(model)
    mean = flat(model)
    grad = per_example_gradients(model, ce_sum, x, y).mean(0)
    opt = make_opt(model)
    one_step(opt, model, x, y)
    torch.testing.assert_close(
        flat(model) - mean, natural_step(opt, mean, grad), rtol=1e-6, atol=1e-9
    )


def test_noisy_adam_first_step_is_adams_sign_step(float64) -> None:
    model = small_mlp()
    x, y = inputs_for(model)
    mean = flat(model)
    grad = per_example_gradients(model, ce_sum, x, y).mean(0)
    opt = NoisyAdam(model, 50.0, lr=0.3, prior_precision=2.0, hess_init=SHARP)
    one_step(opt, model, x, y)
    damping = 2.0 / 50.0
    expected = -0.3 * (grad + damping * mean) / (grad.abs() + damping)
    torch.testing.assert_close(flat(model) - mean, expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(
        opt.posterior().diagonal, 2.0 + 50.0 * grad.square(), rtol=1e-6, atol=0
    )


# --- noisy K-FAC: constant inputs make K-FAC exact ----------------------------------------
def constant_input_problem() -> tuple[nn.Linear, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(5)
    model = nn.Linear(3, 2)
    x = torch.randn(1, 3, generator=generator).expand(400, 3).clone()
    y = torch.randint(0, 2, (400,), generator=generator)
    return model, x, y


def paper_covariance(model: nn.Linear, x: Tensor, y: Tensor, size: float, gamma: float) -> Tensor:
    """``Σ = (G_γ⁻¹ ⊗ A_γ⁻¹)/N`` from the exact Fisher, with π-damping of ``γ``."""
    idx = layer_indices(model, "")
    fisher = empirical_fisher(model, ce_sum, x, y)[idx][:, idx]
    a_bar = torch.cat([x[0], torch.ones(1)])
    a_factor = torch.outer(a_bar, a_bar)
    # With ā fixed, F = G ⊗ āāᵀ exactly; the bias coordinate (ā = 1) reads G off.
    g_factor = fisher[3::4][:, 3::4]
    torch.testing.assert_close(torch.kron(g_factor, a_factor), fisher)
    pi = ((a_factor.trace() / 4) / (g_factor.trace() / 2)).sqrt()
    a_damped = a_factor + pi * gamma**0.5 * torch.eye(4)
    g_damped = g_factor + gamma**0.5 / pi * torch.eye(2)
    covariance = torch.kron(torch.linalg.inv(g_damped), torch.linalg.inv(a_damped)) / size
    order = torch.argsort(idx)  # block order → flat parameter order
    return covariance[order][:, order]


def test_noisy_kfac_posterior_is_the_papers_kronecker_product(float64) -> None:
    model, x, y = constant_input_problem()
    opt = NoisyKFAC(model, 400.0, lr=0.0, prior_precision=4.0, damping=0.05, hess_init=SHARP)
    expected = paper_covariance(model, x, y, 400.0, gamma=4.0 / 400.0 + 0.05)
    one_step(opt, model, x, y)
    torch.testing.assert_close(opt.posterior().covariance(), expected, rtol=1e-6, atol=1e-12)


def test_noisy_kfac_samples_have_the_posterior_covariance(float64) -> None:
    model, x, y = constant_input_problem()
    opt = NoisyKFAC(model, 400.0, lr=0.0, prior_precision=4.0, damping=0.05, hess_init=SHARP)
    one_step(opt, model, x, y)
    covariance = opt.posterior().covariance()
    mean = flat(model)
    draws = 20_000
    samples = torch.empty(draws, mean.numel())
    for i in range(draws):
        with opt.sampled_params():
            samples[i] = flat(model)
    centred = samples - mean
    # Whitened: Σ^{-1/2} Ĉ Σ^{-1/2} ≈ I with ‖error‖_F ≈ sqrt(P(P+1)/draws) ≈ 0.06 for P = 8.
    values, vectors = torch.linalg.eigh(covariance)
    whitening = vectors / values.sqrt()
    white = centred @ whitening
    empirical = white.T @ white / draws
    assert torch.linalg.matrix_norm(empirical - torch.eye(8)) < 0.15
    assert white.mean(0).abs().max() < 4.0 / draws**0.5
