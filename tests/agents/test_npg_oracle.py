"""One NPG / TRPO actor update against the published update computed from the exact Fisher.

Kakade 2001 and Schulman et al. 2015 (TRPO), written anew here from their formulas, in
float64 on a copy of a small CartPole policy (the agent itself runs in float32, as SB3's
observation preprocessing does): the surrogate gradient ``g = E[Â ∇log π(a|s)]`` from
per-example gradients, the exact Fisher ``E_s[J_sᵀ (diag p − p pᵀ) J_s]`` of the actor
(``ngrl.fisher``), ``s = (F + λI)⁻¹ g`` by a dense solve, ``β = sqrt(2δ / sᵀ(F + λI)s)``;
NPG steps ``θ + β s``, TRPO backtracks ``θ + α^k β s`` to the first ``k`` whose mean KL is
below ``δ`` and whose surrogate improves. With the K-FAC preconditioner, ``s`` is the
K-FAC blocks' solve of ``g`` and ``β`` still uses the exact ``F``.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngrl.agents import NPG
from ngrl.agents.policies import is_critic
from ngrl.envs import make_vec_env
from ngrl.fisher import exact_fisher, per_example_gradients


class ActorLogits(nn.Module):
    """The policy's action logits as a function of the observation (for ngrl.fisher)."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, obs: Tensor) -> Tensor:
        features = self.policy.pi_features_extractor(obs)
        return self.policy.action_net(self.policy.mlp_extractor.forward_actor(features))


def rollout(**options: Any) -> tuple[NPG, Any, Tensor]:
    """An NPG model and one collected rollout (its data and actions)."""
    model = NPG(
        "MlpPolicy",
        make_vec_env("CartPole", 2, seed=0),
        n_steps=24,
        seed=0,
        cg_max_steps=500,
        policy_kwargs={"net_arch": [6]},
        **options,
    )
    _, callback = model._setup_learn(10**6, callback=None)
    callback.on_training_start(locals(), globals())
    model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    data = next(model.rollout_buffer.get(batch_size=None))
    return model, data, data.actions.long().flatten()


def actor_mask(policy: nn.Module) -> Tensor:
    return torch.cat(
        [torch.full((p.numel(),), not is_critic(name)) for name, p in policy.named_parameters()]
    )


def published_update(model: NPG, data: Any, actions: Tensor) -> dict[str, Tensor]:
    """``g``, ``F + λI`` (float64), the flat actor parameters and the normalised
    advantages, in ``model.actor_params`` order."""
    logits = ActorLogits(copy.deepcopy(model.policy).double())
    obs = data.observations.double()
    advantages = data.advantages.double()
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    mask = actor_mask(model.policy)
    # ∇log π(a|s) = −∇ cross_entropy(logits, a); at θ_old the ratio's gradient is ∇log π.
    scores = -per_example_gradients(logits, F.cross_entropy, obs, actions)[:, mask]
    gradient = (advantages[:, None] * scores).mean(0)
    fisher = exact_fisher(logits, obs, "categorical")[mask][:, mask]
    damped = fisher + model.cg_damping * torch.eye(len(gradient), dtype=fisher.dtype)
    start = torch.nn.utils.parameters_to_vector(model.actor_params).detach().double()
    return {"gradient": gradient, "damped": damped, "start": start, "advantages": advantages}


def step_size(direction: Tensor, damped: Tensor, target_kl: float) -> float:
    return float((2.0 * target_kl / (direction @ damped @ direction)) ** 0.5)


def actor_after(model: NPG) -> Tensor:
    return torch.nn.utils.parameters_to_vector(model.actor_params).detach().double()


def assert_same_step(step: Tensor, expected: Tensor) -> None:
    """The agent computes in float32 (CG on Fisher-vector products), the reference in
    float64 with a dense solve: equal to float32 accuracy relative to the step's size."""
    torch.testing.assert_close(step, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))


def test_npg_takes_the_natural_gradient_step_scaled_to_the_kl_budget() -> None:
    model, data, actions = rollout()
    ref = published_update(model, data, actions)
    direction = torch.linalg.solve(ref["damped"], ref["gradient"])
    expected = ref["start"] + step_size(direction, ref["damped"], model.target_kl) * direction
    stats = model._train_actor(data, actions)
    assert_same_step(actor_after(model) - ref["start"], expected - ref["start"])
    assert stats["step_fraction"] == 1.0
    # The quadratic model of the KL at the step is the budget; the measured KL is near it.
    assert stats["kl_divergence"] == pytest.approx(model.target_kl, rel=0.3)


def test_trpo_backtracks_to_the_first_step_inside_the_trust_region_that_improves() -> None:
    model, data, actions = rollout(line_search=True, target_kl=0.02)
    ref = published_update(model, data, actions)
    direction = torch.linalg.solve(ref["damped"], ref["gradient"])
    full = step_size(direction, ref["damped"], model.target_kl)
    policy = copy.deepcopy(model.policy).double()
    logits = ActorLogits(policy)
    actor = [p for name, p in policy.named_parameters() if not is_critic(name)]
    obs, old_log_prob = data.observations.double(), data.old_log_prob.double()

    def trial(theta: Tensor) -> tuple[Tensor, float, float]:
        """Log-probabilities, surrogate and mean KL from the old policy at ``theta``."""
        torch.nn.utils.vector_to_parameters(theta, actor)
        with torch.no_grad():
            log_probs = torch.log_softmax(logits(obs), -1)
        ratio = torch.exp(log_probs.gather(1, actions[:, None])[:, 0] - old_log_prob)
        kl = (old.exp() * (old - log_probs)).sum(1).mean() if theta is not ref["start"] else 0.0
        return log_probs, float((ref["advantages"] * ratio).mean()), float(kl)

    old = trial(ref["start"])[0]
    surrogate = trial(ref["start"])[1]
    expected, coefficient = ref["start"], full
    for _ in range(model.line_search_max_iter):  # the published rule, transcribed
        _, objective, kl = trial(ref["start"] + coefficient * direction)
        if kl < model.target_kl and objective > surrogate:
            expected = ref["start"] + coefficient * direction
            break
        coefficient *= model.line_search_shrinking_factor
    stats = model._train_actor(data, actions)
    assert_same_step(actor_after(model) - ref["start"], expected - ref["start"])
    assert 0.0 < stats["kl_divergence"] < model.target_kl
    assert stats["step_fraction"] == pytest.approx(coefficient / full)


def test_npg_with_the_kfac_preconditioner_steps_along_the_kfac_direction() -> None:
    model, data, actions = rollout(preconditioner="kfac")
    model.actor_kfac.param_groups[0]["factor_decay"] = 0.0  # the batch's statistics alone
    ref = published_update(model, data, actions)
    model._train_actor(data, actions)
    step = actor_after(model) - ref["start"]
    # The K-FAC solve of g, per layer, with the statistics this update captured.
    kfac = model.actor_kfac
    parts = ref["gradient"].split([p.numel() for p in model.actor_params])
    grads = {id(p): part.view_as(p) for p, part in zip(model.actor_params, parts, strict=True)}
    damping = float(kfac.hyperparameter("damping"))
    solved = {}
    for layer in kfac.layers:
        block_grad = layer.gather([grads[id(p)].float() for p in layer.params])
        x = kfac.blocks[layer.name].precondition(block_grad, damping).double()
        for p, part in zip(layer.params, layer.scatter(x), strict=True):
            solved[id(p)] = part
    direction = torch.cat([solved[id(p)].reshape(-1) for p in model.actor_params])
    expected = step_size(direction, ref["damped"], model.target_kl) * direction
    assert_same_step(step, expected)


def test_npg_with_kfac_refined_by_enough_cg_steps_takes_the_natural_gradient_step() -> None:
    """K-FAC as the preconditioner of conjugate gradient on the exact Fisher: with enough
    iterations, the published natural-gradient step, as plain CG gives it."""
    model, data, actions = rollout(preconditioner="kfac", kfac_kwargs={"cg_steps": 500})
    ref = published_update(model, data, actions)
    direction = torch.linalg.solve(ref["damped"], ref["gradient"])
    expected = step_size(direction, ref["damped"], model.target_kl) * direction
    model._train_actor(data, actions)
    assert_same_step(actor_after(model) - ref["start"], expected)
