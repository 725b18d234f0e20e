"""The K-FAC policies inside SB3's own algorithms, and their checkpoints."""

from __future__ import annotations

import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, PPO

from ngrl import KFAC
from ngrl.agents import ACKTR
from ngrl.agents.policies import KFACActorCriticPolicy
from ngrl.envs import make_vec_env
from ngrl.fisher import exact_fisher


@pytest.mark.parametrize("algorithm", [A2C, PPO])
def test_policy_runs_inside_sb3_and_captures_statistics(algorithm: type) -> None:
    env = make_vec_env("CartPole", 2, seed=0)
    kwargs = (
        {"use_rms_prop": False}
        if algorithm is A2C
        else {"n_steps": 64, "batch_size": 64, "n_epochs": 1}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no optimizer_class warning, no uncaptured warning
        model = algorithm(KFACActorCriticPolicy, env, seed=0, **kwargs)
        before = [p.detach().clone() for p in model.policy.parameters()]
        model.learn(256)
    optimizer = model.policy.optimizer
    assert isinstance(optimizer, KFAC)
    assert optimizer.steps > 0
    assert all(block.initialized for block in optimizer.blocks.values())
    assert any(
        not torch.equal(b, p) for b, p in zip(before, model.policy.parameters(), strict=True)
    )


def test_a2c_optimizer_choice_is_reported_not_silently_dropped() -> None:
    env = make_vec_env("CartPole", 1, seed=0)
    with pytest.warns(UserWarning, match="RMSprop"):
        A2C(KFACActorCriticPolicy, env)  # A2C hands its RMSprop to the policy


def test_continuous_policy_gives_log_std_a_diagonal_block() -> None:
    env = make_vec_env("Pendulum", 2, seed=0)
    model = ACKTR("MlpPolicy", env, n_steps=8, seed=0, cold_start_steps=0)
    model.learn(64)
    block = model.policy.optimizer.blocks[""]  # the policy module itself owns log_std
    assert block.shape == (1,)
    assert block.initialized


def test_save_load_round_trip_keeps_predictions_and_kfac_factors(tmp_path: Path) -> None:
    env = make_vec_env("CartPole", 2, seed=0)
    model = ACKTR("MlpPolicy", env, seed=0, cold_start_steps=2)
    model.learn(400)
    model.save(tmp_path / "model.zip")
    loaded = ACKTR.load(tmp_path / "model.zip", env=env)

    obs = env.reset()
    np.testing.assert_array_equal(
        model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0]
    )
    saved_state = model.policy.optimizer.state_dict()
    loaded_state = loaded.policy.optimizer.state_dict()
    assert saved_state["param_groups"][0]["step"] == loaded_state["param_groups"][0]["step"] > 0
    for index, entry in saved_state["state"].items():
        for key in ("a_factor", "g_factor", "momentum_buffer"):
            if key in entry:
                torch.testing.assert_close(
                    loaded_state["state"][index][key], entry[key], rtol=0, atol=0
                )
    assert loaded.kl_clip == model.kl_clip and loaded._n_updates == model._n_updates


def test_load_refuses_a_checkpoint_of_another_curvature(tmp_path: Path) -> None:
    env = make_vec_env("CartPole", 2, seed=0)
    model = ACKTR("MlpPolicy", env, seed=0, cold_start_steps=0, curvature="ekfac")
    model.learn(160)
    model.save(tmp_path / "model.zip")
    with pytest.raises(ValueError, match="'ekfac' curvature statistics.*uses 'kfac'"):
        other = model.kfac_config.replace(curvature="kfac")
        ACKTR.load(tmp_path / "model.zip", env=env, custom_objects={"kfac_config": other})
    assert ACKTR.load(tmp_path / "model.zip", env=env).curvature == "ekfac"


def test_statistics_of_fewer_examples_than_the_batch_come_from_their_own_forward_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Fixed targets instead of sampled ones, so that both ways see the same Fisher loss.
    def fixed_target_loss(output, kind=None, reduction="mean", generator=None):  # noqa: ANN001, ANN202
        if kind == "gaussian":
            return 0.5 * (output - (output.detach() + 0.7)).square().mean(0).sum()
        return -output.log_prob(output.probs.argmax(-1)).mean()

    monkeypatch.setattr("ngrl.agents.policies.fisher_loss", fixed_target_loss)
    env = make_vec_env("CartPole", 2, seed=0)
    model = ACKTR("MlpPolicy", env, seed=0, kfac_kwargs={"stats_batch_size": 4})
    policy, optimizer = model.policy, model.policy.optimizer
    obs = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))

    def factors() -> dict[str, dict[str, torch.Tensor]]:
        found = {name: block.state_dict() for name, block in optimizer.blocks.items()}
        for block in optimizer.blocks.values():
            block.load_state_dict({})  # the next capture starts afresh
        return found

    distribution, values = policy.distribution_and_values(obs)
    policy.capture_fisher(distribution, values.flatten())  # the first 4 of the whole pass
    whole = factors()
    seen: list[int] = []
    forward = policy.distribution_and_values
    monkeypatch.setattr(
        policy, "distribution_and_values", lambda o: seen.append(len(o)) or forward(o)
    )
    distribution, values = forward(obs)
    probs = distribution.distribution.probs
    policy.capture_fisher(distribution, values.flatten(), obs=obs)
    assert seen == [4]
    assert distribution.distribution.probs is probs  # the caller's distribution is kept
    own = factors()
    for name, state in whole.items():
        assert state, name
        for key, value in state.items():
            torch.testing.assert_close(own[name][key], value, rtol=1e-5, atol=1e-7)


def flat_hessian(scalar: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """The Hessian of ``scalar`` in the flat concatenation of ``params``."""
    grads = torch.autograd.grad(scalar, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = [torch.autograd.grad(g, params, retain_graph=True) for g in flat]
    return torch.stack([torch.cat([r.reshape(-1) for r in row]) for row in rows])


def test_the_divergence_acktr_refines_on_is_the_fisher_its_statistics_sample() -> None:
    """``fisher_divergence``'s Hessian is the categorical Fisher of the logits plus
    ``(2c)²·JᵀJ`` of the values: the expectation of the statistics of ``capture_fisher``,
    whose value term is ``2c·½(V − v̂)²``."""
    model = ACKTR("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [4]}, seed=0)
    policy = model.policy

    class Head(torch.nn.Module):
        def __init__(self, output: str) -> None:
            super().__init__()
            self.policy, self.output = policy, output

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p = self.policy
            if self.output == "logits":
                return p.action_net(p.mlp_extractor.forward_actor(p.extract_features(x)))
            return p.value_net(p.mlp_extractor.forward_critic(p.extract_features(x)))

    obs, coef = torch.randn(6, 4), 0.5
    distribution, values = policy.distribution_and_values(obs)
    divergence = policy.fisher_divergence(distribution, values, vf_fisher_coef=coef)
    hessian = flat_hessian(divergence, list(policy.parameters()))
    expected = exact_fisher(Head("logits"), obs, "categorical")
    expected = expected + (2 * coef) ** 2 * exact_fisher(Head("values"), obs, "gaussian")
    torch.testing.assert_close(hessian, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("env", "settings"),
    [
        ("CartPole", {}),
        ("CartPole", {"trust_region": "split"}),
        ("Pendulum", {"n_critic_updates": 2, "n_steps": 8}),
    ],
)
def test_acktr_with_cg_steps_refines_its_steps_on_the_exact_fisher(
    env: str, settings: dict[str, object]
) -> None:
    """Every K-FAC step gets the divergence (one conjugate-gradient iteration from zero
    is K-FAC's direction rescaled, so the trust region's ν changes), in each kind of
    trust region."""
    scales = {}
    for cg_steps in (0, 1):
        model = ACKTR(
            "MlpPolicy",
            make_vec_env(env, 2, seed=0),
            seed=0,
            cold_start_steps=1,
            learning_rate=0.25,
            kl_clip=1e-6,  # binding: ν measures the quadratic
            cg_steps=cg_steps,
            **settings,  # type: ignore[arg-type]
        )
        optimizer = model.policy.optimizer
        with mock.patch.object(KFAC, "_refined", autospec=True, side_effect=KFAC._refined) as spy:
            model.learn(3 * model.n_steps * 2)
        assert spy.call_count == (
            2 * (1 + (settings.get("trust_region") == "split")) if cg_steps else 0
        )
        scales[cg_steps] = list(optimizer.trust_region_scales)
    assert scales[0] != scales[1]
