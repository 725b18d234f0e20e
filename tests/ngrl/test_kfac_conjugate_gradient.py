"""K-FAC refined by conjugate gradient on the exact curvature (``cg_steps`` with
``step(divergence=...)``), against the exact Fisher of ngrl.fisher in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngrl import fisher_divergence
from ngrl.fisher import exact_fisher, flat_gradient
from ngrl.optim import KFAC
from tests.helpers.oracle import flat_parameters, sample_classes

pytestmark = pytest.mark.usefixtures("float64")

LR, DAMPING = 0.3, 1e-2


def prepared(cg_steps: int, **options: object) -> tuple[nn.Module, KFAC, Tensor, Tensor]:
    """A two-layer model with one captured batch and the gradient of a cross-entropy in
    ``.grad``; the optimizer (no momentum) and the batch's logits and inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, labels = torch.randn(16, 4), torch.randint(0, 3, (16,))
    settings: dict[str, object] = dict(lr=LR, damping=DAMPING, kl_clip=None, momentum=0.0)
    opt = KFAC(model, cg_steps=cg_steps, **{**settings, **options})  # type: ignore[arg-type]
    logits = model(x)
    with opt.capture():
        F.cross_entropy(logits, sample_classes(logits)).backward(retain_graph=True)
    opt.zero_grad()
    F.cross_entropy(logits, labels).backward(retain_graph=True)
    return model, opt, logits, x


def taken_direction(model: nn.Module, opt: KFAC, logits: Tensor | None) -> Tensor:
    """``X`` of one step (``θ ← θ − lr·ν·X``, ``ν`` of the trust region or 1), flat."""
    before = flat_parameters(model).clone()
    opt.step(divergence=None if logits is None else fisher_divergence(logits, "categorical"))
    return (before - flat_parameters(model)) / LR


def test_enough_iterations_give_the_exact_damped_natural_gradient() -> None:
    model, opt, logits, x = prepared(cg_steps=100)
    damped = exact_fisher(model, x, "categorical") + DAMPING * torch.eye(43)
    expected = torch.linalg.solve(damped, flat_gradient(model))
    torch.testing.assert_close(taken_direction(model, opt, logits), expected, rtol=1e-5, atol=1e-8)


def test_one_iteration_is_kfacs_direction_scaled_by_the_exact_curvature() -> None:
    """CG's first iterate from zero is ``α·M⁻¹g`` with ``α = gᵀM⁻¹g / zᵀ(F + λI)z``."""
    model, opt, logits, x = prepared(cg_steps=0)
    kfac = taken_direction(model, opt, None)
    model, opt, logits, x = prepared(cg_steps=1)
    gradient = flat_gradient(model)
    damped = exact_fisher(model, x, "categorical") + DAMPING * torch.eye(43)
    alpha = (gradient @ kfac) / (kfac @ damped @ kfac)
    refined = taken_direction(model, opt, logits)
    torch.testing.assert_close(refined, alpha * kfac, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(refined, kfac)  # the scale is not 1: the test can tell


def test_the_trust_region_spends_its_radius_on_the_exact_quadratic() -> None:
    """With a binding ``kl_clip``, ``ν = sqrt(δ / (lr² gᵀX))`` of the refined ``X``: the
    step's quadratic in the exact damped Fisher, ``lr²·(νX)ᵀ(F + λI)(νX)``, is ``δ``."""
    kl_clip = 1e-5
    model, opt, logits, x = prepared(cg_steps=100, kl_clip=kl_clip)
    damped = exact_fisher(model, x, "categorical") + DAMPING * torch.eye(43)
    step = taken_direction(model, opt, logits)  # ν·X
    nu = opt.trust_region_scales[0]
    assert 0.0 < nu < 1.0
    assert LR**2 * float(step @ damped @ step) == pytest.approx(kl_clip, rel=1e-6)
    x_exact = torch.linalg.solve(damped, flat_gradient(model))
    assert nu == pytest.approx(math.sqrt(kl_clip / (LR**2 * float(flat_gradient(model) @ x_exact))))


def test_refinement_needs_the_divergence_and_a_valid_count() -> None:
    model, opt, _, _ = prepared(cg_steps=2)
    with pytest.raises(ValueError, match=r"cg_steps=2 .* step\(divergence=\.\.\.\)"):
        opt.step()
    with pytest.raises(ValueError, match="Invalid cg_steps value: -1"):
        KFAC(model, cg_steps=-1)
    with pytest.raises(ValueError, match="Invalid cg_steps value: 1.5"):
        KFAC(model, cg_steps=1.5)  # type: ignore[arg-type]


def test_a_schedule_starts_with_kfacs_step_and_then_refines() -> None:
    """``cg_steps=f(step)``: step 0 takes K-FAC's ``X`` (the divergence is not used), step 1
    the exact damped natural gradient at the new parameters."""
    model, opt, logits, x = prepared(cg_steps=lambda step: 0 if step == 0 else 100)
    model_kfac, opt_kfac, _, _ = prepared(cg_steps=0)
    assert opt.cg_steps == 0
    torch.testing.assert_close(
        taken_direction(model, opt, logits), taken_direction(model_kfac, opt_kfac, None)
    )
    assert opt.cg_steps == 100
    logits = model(x)
    with opt.capture():
        F.cross_entropy(logits, sample_classes(logits)).backward(retain_graph=True)
    opt.zero_grad()
    F.cross_entropy(logits, torch.randint(0, 3, (16,))).backward(retain_graph=True)
    damped = exact_fisher(model, x, "categorical") + DAMPING * torch.eye(43)
    expected = torch.linalg.solve(damped, flat_gradient(model))
    torch.testing.assert_close(taken_direction(model, opt, logits), expected, rtol=1e-5, atol=1e-8)


def test_a_bad_scheduled_count_is_refused_at_its_step() -> None:
    model, opt, logits, _ = prepared(cg_steps=lambda step: 2 if step == 0 else -1)
    taken_direction(model, opt, logits)
    before = flat_parameters(model).clone()
    with pytest.raises(ValueError, match="Invalid cg_steps value: -1"):
        opt.step(divergence=fisher_divergence(logits, "categorical"))
    torch.testing.assert_close(flat_parameters(model), before)


def test_a_state_without_cg_steps_keeps_the_constructors_count() -> None:
    """Checkpoints from before ``cg_steps`` was a hyperparameter of ``param_groups``."""
    model, opt, _, _ = prepared(cg_steps=0)
    state = opt.state_dict()
    del state["param_groups"][0]["cg_steps"]
    resumed = KFAC(model, cg_steps=3)
    resumed.load_state_dict(state)
    assert resumed.cg_steps == 3 and resumed.config.cg_steps == 3
