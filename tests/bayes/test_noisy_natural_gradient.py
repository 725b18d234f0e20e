"""Noisy natural gradient with any curvature block, against exact answers (float64).

With one constant input the Fisher of a dense layer is exactly ``G ⊗ āāᵀ``, so every
Kronecker estimate (K-FAC, EK-FAC, KPSVD, TKFAC) equals it, and the posterior must be
``(F + γI)⁻¹ / N``; for every curvature the posterior must be the block's own damped
matrix, its samples must have that covariance, and its mean step must be the natural
gradient of that posterior.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngrl import fisher_loss
from ngrl.bayes import NoisyKFAC, NoisyNaturalGradient
from ngrl.bayes.noisy_natural_gradient import sampling_curvatures
from ngrl.fisher import empirical_fisher, layer_indices, per_example_gradients
from ngrl.optim import KFAC
from tests.bayes.test_vi_exact import (
    SHARP,
    ce_sum,
    constant_input_problem,
    flat,
    inputs_for,
    natural_step,
    one_step,
    small_cnn,
    small_mlp,
)

CURVATURES = sampling_curvatures()
# Kronecker estimates, exact for a layer with one constant input.
EXACT_HERE = ("kfac", "ekfac", "kpsvd", "tkfac")
SIZE, PRIOR, DAMPING = 400.0, 4.0, 0.05
GAMMA = PRIOR / SIZE + DAMPING


def test_the_curvatures_that_can_sample_are_the_expected_ones() -> None:
    assert set(CURVATURES) == {"diag", "ekfac", "kfac", "kpsvd", "mfac", "shampoo", "tkfac"}


def noisy(model: nn.Module, curvature: str, **kwargs: object) -> NoisyNaturalGradient:
    options = {"damping_rule": "exact"} if curvature in ("kfac", "kpsvd", "tkfac") else {}
    settings: dict[str, object] = dict(
        lr=0.0, prior_precision=PRIOR, damping=DAMPING, hess_init=SHARP
    )
    settings.update(kwargs)
    return NoisyNaturalGradient(
        model, SIZE, curvature=curvature, curvature_options=options, **settings
    )


def block_covariance(opt: NoisyNaturalGradient, model: nn.Linear) -> Tensor:
    """``(F̂ + γI)⁻¹ / N`` of the layer's block, in flat parameter order."""
    (block,) = opt.blocks.values()
    covariance = torch.linalg.inv(block.damped_dense(GAMMA)) / SIZE
    order = torch.argsort(layer_indices(model, ""))
    return covariance[order][:, order]


@pytest.mark.parametrize("curvature", EXACT_HERE)
def test_with_a_constant_input_the_posterior_is_the_damped_exact_fisher(
    float64: None, curvature: str
) -> None:
    model, x, y = constant_input_problem()
    idx = layer_indices(model, "")
    fisher = empirical_fisher(model, ce_sum, x, y)[idx][:, idx]
    expected = torch.linalg.inv(fisher + GAMMA * torch.eye(len(idx))) / SIZE
    order = torch.argsort(idx)
    opt = noisy(model, curvature)
    one_step(opt, model, x, y)
    torch.testing.assert_close(
        opt.posterior().covariance(), expected[order][:, order], rtol=1e-6, atol=1e-12
    )


@pytest.mark.parametrize("curvature", CURVATURES)
def test_the_posterior_is_the_blocks_damped_matrix_and_samples_have_its_covariance(
    float64: None, curvature: str
) -> None:
    model, x, y = constant_input_problem()
    opt = noisy(model, curvature)
    one_step(opt, model, x, y)
    covariance = opt.posterior().covariance()
    torch.testing.assert_close(covariance, block_covariance(opt, model), rtol=1e-6, atol=1e-12)
    torch.manual_seed(0)
    mean, draws = flat(model), 4000
    samples = torch.empty(draws, mean.numel())
    for i in range(draws):
        with opt.sampled_params():
            samples[i] = flat(model)
    values, vectors = torch.linalg.eigh(covariance)
    white = (samples - mean) @ (vectors / values.sqrt())
    # Whitened: ≈ I with ‖error‖_F ≈ sqrt(P(P+1)/draws) ≈ 0.13 for P = 8.
    assert torch.linalg.matrix_norm(white.T @ white / draws - torch.eye(8)) < 0.3
    assert white.mean(0).abs().max() < 4.0 / draws**0.5


@pytest.mark.parametrize("make_model", [small_mlp, small_cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("curvature", ["ekfac", "diag", "mfac"])
def test_the_mean_step_is_the_natural_gradient_of_the_posterior(
    float64: None, make_model, curvature: str
) -> None:
    model = make_model()
    x, y = inputs_for(model)
    mean = flat(model)
    grad = per_example_gradients(model, ce_sum, x, y).mean(0)
    opt = noisy(model, curvature, lr=0.3)
    one_step(opt, model, x, y)
    torch.testing.assert_close(
        flat(model) - mean, natural_step(opt, mean, grad), rtol=1e-6, atol=1e-9
    )


def test_kl_clip_scales_the_mean_step_to_its_radius(float64: None) -> None:
    model = small_mlp()
    x, y = inputs_for(model)
    free = noisy(small_mlp(), "ekfac", lr=0.3)
    free.model.load_state_dict(model.state_dict())
    mean = flat(model)
    one_step(free, free.model, x, y)
    unclipped = flat(free.model) - mean
    opt = noisy(model, "ekfac", lr=0.3, kl_clip=1e-6)
    one_step(opt, model, x, y)
    change = flat(model) - mean
    precision = opt.posterior().precision() / opt.effective_size  # F̂ + γI, mean-loss scale
    assert 0.0 < opt.trust_region_scale < 1.0
    torch.testing.assert_close(change, opt.trust_region_scale * unclipped, rtol=1e-6, atol=0)
    torch.testing.assert_close(change @ precision @ change, torch.tensor(1e-6), rtol=1e-6, atol=0)


def test_sampled_fisher_statistics_are_k_fac_s_and_leave_the_gradient_alone(
    float64: None,
) -> None:
    model = small_mlp()
    twin = small_mlp()
    twin.load_state_dict(model.state_dict())
    x, y = inputs_for(model)
    opt = noisy(model, "kfac", fisher="sampled")
    with opt.sampled_params(train=True):
        output = model(x)
        opt.capture_fisher(fisher_loss(output, kind="categorical", generator=seeded()))
        F.cross_entropy(output, y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    F.cross_entropy(twin(x), y).backward()
    for grad, expected in zip(grads, (p.grad for p in twin.parameters()), strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)
    reference = KFAC(twin, curvature="kfac")
    reference.capture_backward(fisher_loss(twin(x), kind="categorical", generator=seeded()))
    for name, block in opt.blocks.items():
        expected = reference.blocks[name]
        torch.testing.assert_close(block.a_factor, expected.a_factor, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(block.g_factor, expected.g_factor, rtol=1e-10, atol=1e-12)


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(7)


def test_capture_fisher_is_refused_where_it_would_count_twice_or_nothing() -> None:
    model = small_mlp()
    x, _ = inputs_for(model)
    empirical = NoisyNaturalGradient(model, 10.0)
    with pytest.raises(RuntimeError, match="capture_fisher\\(\\) is for fisher='sampled'"):
        with empirical.sampled_params(train=True):
            empirical.capture_fisher(fisher_loss(model(x), kind="categorical"))
    sampled = NoisyNaturalGradient(model, 10.0, fisher="sampled")
    with pytest.raises(RuntimeError, match="inside `with optimizer.sampled_params"):
        sampled.capture_fisher(fisher_loss(model(x), kind="categorical"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"curvature": "kfac-corrected"},
            "'kfac-corrected' with its default options has no exact matrix power -1/2 to draw "
            "posterior samples; curvatures that have: diag, ekfac, kfac, kpsvd, mfac, shampoo, "
            "tkfac",
        ),
        (
            {"curvature": "shampoo", "curvature_options": {"grafting": "sgd"}},
            "'shampoo' with {'grafting': 'sgd'} has no exact matrix power -1/2",
        ),
        ({"curvature": "kfca"}, "Invalid curvature: 'kfca'; available: deflation, diag"),
        ({"curvature_options": {"rank": 2}}, "Invalid curvature_options for 'kfac': {'rank': 2}"),
        ({"fisher": "true"}, "fisher"),
        ({"kl_clip": 0.0}, "kl_clip"),
    ],
)
def test_bad_settings_are_refused_with_what_works(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        NoisyNaturalGradient(small_mlp(), 10.0, **kwargs)
    assert message in str(info.value)


def test_noisy_kfac_is_the_factored_k_fac_instance(float64: None) -> None:
    model, x, y = constant_input_problem()
    twin = nn.Linear(3, 2)
    twin.load_state_dict(model.state_dict())
    kfac = NoisyKFAC(model, SIZE, lr=0.0, prior_precision=PRIOR, damping=DAMPING, hess_init=SHARP)
    generic = NoisyNaturalGradient(
        twin,
        SIZE,
        curvature="kfac",
        curvature_options={"damping_rule": "factored"},
        lr=0.0,
        prior_precision=PRIOR,
        damping=DAMPING,
        hess_init=SHARP,
    )
    one_step(kfac, model, x, y)
    one_step(generic, twin, x, y)
    torch.testing.assert_close(
        kfac.posterior().covariance(), generic.posterior().covariance(), rtol=1e-10, atol=1e-14
    )
