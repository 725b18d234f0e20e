"""Presets: named presets, and schedules that follow a published horizon."""

from __future__ import annotations

import pytest
from stable_baselines3.common.utils import LinearSchedule

from ngrl.agents.presets import LinearDecay, named_presets, resolve_config
from ngrl.envs import resolve


def test_a_linear_decay_over_the_run_is_sb3s_linear_schedule() -> None:
    ours, sb3 = LinearDecay(0.25, 1000, 1000), LinearSchedule(0.25, 0.0, 1.0)
    for progress_remaining in (1.0, 0.7, 0.2, 0.0):
        assert ours(progress_remaining) == pytest.approx(sb3(progress_remaining))


def test_a_short_run_follows_the_start_of_a_longer_schedule() -> None:
    """1.5M steps of baselines' 10M-step Atari schedule end at 0.85 × the start, not at 0."""
    decay = LinearDecay(0.25, 1_500_000, 10_000_000)
    assert decay(1.0) == 0.25
    assert decay(0.0) == pytest.approx(0.25 * 0.85)
    assert decay(1 / 3) == pytest.approx(0.25 * (1 - 1_000_000 / 10_000_000))
    assert LinearDecay(1.0, 2000, 1000)(0.0) == 0.0  # past the horizon: 0, never negative


def test_schedule_timesteps_reaches_the_lin_schedules() -> None:
    config = resolve_config("ppo", resolve("Breakout"), [("schedule_timesteps", 4000)])
    config.timesteps = 1000
    learning_rate = config.algorithm_kwargs()["learning_rate"]
    assert learning_rate(0.0) == pytest.approx(2.5e-4 * 0.75)


def test_named_presets_start_from_the_algorithm_and_change_what_they_name() -> None:
    assert "baselines" in named_presets("acktr")
    breakout = resolve("Breakout")
    default = resolve_config("acktr", breakout, [])
    baselines = resolve_config("acktr", breakout, [], "baselines")
    assert (baselines.n_envs, default.n_envs) == (32, 16)
    starts = [c.algorithm_kwargs()["learning_rate"](1.0) for c in (baselines, default)]
    assert starts == [0.25, 0.5]
    assert [c.algorithm_kwargs()["kl_clip"] for c in (baselines, default)] == [1e-3, 2e-3]
    assert [c.algorithm_kwargs()["momentum"] for c in (baselines, default)] == [0.9, 0.0]
    assert baselines.hyperparameters.get("curvature", "kfac") == "kfac"
    with pytest.raises(ValueError, match="no preset 'x'; its presets: baselines"):
        resolve_config("acktr", breakout, [], "x")
    with pytest.raises(ValueError, match="a2c has no preset 'baselines'; its presets: none"):
        resolve_config("a2c", breakout, [], "baselines")


def test_the_recurrent_pendulum_presets_share_rl_zoos_network() -> None:
    from stable_baselines3.common.vec_env import VecNormalize
    from torch import nn

    from ngrl.envs import make_vec_env

    spec = resolve("PendulumNoVel")
    configs = [resolve_config(algo, spec, []) for algo in ("ppo-lstm", "acktr-lstm")]
    for config in configs:
        policy_kwargs = config.algorithm_kwargs()["policy_kwargs"]
        assert policy_kwargs["activation_fn"] is nn.ReLU
        assert policy_kwargs["lstm_hidden_size"] == 64
    assert (
        configs[0].hyperparameters["policy_kwargs"] == configs[1].hyperparameters["policy_kwargs"]
    )
    ppo, acktr = (config.normalized(make_vec_env(spec.gym_id, 1, seed=0)) for config in configs)
    assert isinstance(ppo, VecNormalize) and ppo.norm_obs and not ppo.norm_reward  # rl-zoo3's
    assert isinstance(acktr, VecNormalize) and acktr.norm_obs and acktr.norm_reward


def test_an_unknown_activation_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"activation_fn 'swish' is unknown; choose one of: relu"):
        resolve_config("acktr", resolve("Pendulum"), [("policy_kwargs.activation_fn", "swish")])
    with pytest.raises(ValueError, match="'normalize_reward' takes true or false"):
        resolve_config("acktr", resolve("Pendulum"), [("normalize_reward", 1)])
    with pytest.raises(ValueError, match="normalize_reward has no effect without normalize"):
        resolve_config("acktr", resolve("CartPole"), [("normalize_reward", False)])


def test_the_continuous_default_departs_from_baselines_in_noise_kl_target_and_step() -> None:
    """The continuous default starts its action noise at std 1/e, adapts its step to a
    KL of 0.01 in a 0.05 region, and refines the step by 5 conjugate-gradient iterations
    at damping 0.1 without momentum; --preset baselines keeps log-std 0, 0.002 in 0.01
    and K-FAC's own step with damping 0.01 and momentum 0.9."""
    import math

    from ngrl.agents import ACKTR
    from ngrl.envs import make_vec_env

    spec = resolve("HalfCheetah")
    stds, budgets, steps = [], [], []
    for preset in (None, "baselines"):
        config = resolve_config("acktr", spec, [], preset)
        model = ACKTR(
            config.policy, make_vec_env(spec.gym_id, 1, seed=0), **config.algorithm_kwargs()
        )
        stds.append(model.policy.log_std.exp().tolist())
        optimizer = model.policy.optimizer
        budgets.append((model.target_kl, optimizer.hyperparameter("kl_clip")))
        steps.append(
            (
                optimizer.cg_steps,
                optimizer.hyperparameter("damping"),
                optimizer.hyperparameter("momentum"),
            )
        )
    assert stds[0] == pytest.approx([math.exp(-1.0)] * 6)
    assert stds[1] == pytest.approx([1.0] * 6)
    assert budgets == [(0.01, 0.05), (0.002, 0.01)]
    assert steps == [(5, 0.1, 0.0), (0, 0.01, 0.9)]
