"""ACKTR with the critic fitted apart (``n_critic_updates``, the paper's continuous-control
agent): the layers split between two K-FAC optimizers, the actor's step is the joint
step without a value term, and the critic's steps are K-FAC steps on the value loss alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ngrl.agents import ACKTR, RecurrentACKTR
from ngrl.agents.acktr import CRITIC_KFAC_DEFAULTS
from ngrl.agents.policies import is_critic
from ngrl.envs import make_vec_env
from ngrl.fisher import exact_fisher, layer_indices
from ngrl.optim import KFAC

N_ENVS, N_STEPS = 4, 8


def agent(**kwargs: object) -> ACKTR:
    env = make_vec_env("CartPole", N_ENVS, seed=0)
    options = dict(n_steps=N_STEPS, seed=0, cold_start_steps=0, learning_rate=0.1) | kwargs
    return ACKTR("MlpPolicy", env, **options)  # type: ignore[arg-type]


def test_the_layers_split_between_the_policy_and_the_critic_optimizers() -> None:
    for model in (
        agent(n_critic_updates=1),
        RecurrentACKTR(
            "MlpLstmPolicy",
            make_vec_env("CartPoleNoVel", 2, seed=0),
            n_steps=4,
            n_critic_updates=1,
            policy_kwargs=dict(lstm_hidden_size=8, net_arch=dict(pi=[8], vf=[8])),
        ),
    ):
        assert model.critic_optimizer is not None
        actor = set(model.policy.optimizer.blocks)
        critic = set(model.critic_optimizer.blocks)
        assert actor and critic and not actor & critic
        assert not any(is_critic(name) for name in actor)
        assert all(is_critic(name) for name in critic)
        named = {n.rsplit(".", 1)[0] for n, _ in model.policy.named_parameters() if "." in n}
        assert {n for n in named if is_critic(n)} <= {b.split(".ih_l")[0] for b in critic} | {
            b.split(".hh_l")[0] for b in critic
        }
    assert agent().critic_optimizer is None


def test_the_actor_step_is_the_joint_step_without_the_value_term() -> None:
    # One update each (SB3 seeds the global generators at construction: build, then learn).
    start = agent().policy
    separate = agent(n_critic_updates=3).learn(N_ENVS * N_STEPS)
    # The value term's gradient is zero, so its blocks add nothing to the trust region.
    joint = agent(vf_coef=0.0).learn(N_ENVS * N_STEPS)
    moved = False
    for (name, p), q in zip(
        separate.policy.named_parameters(), joint.policy.parameters(), strict=True
    ):
        if not is_critic(name):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            moved = moved or not torch.equal(p, start.get_parameter(name))
    assert moved


def test_the_critic_steps_are_kfac_steps_on_the_value_loss_alone() -> None:
    """The oracle: ngrl's K-FAC with the critic's options on a copy of the critic's
    modules alone, stepped on the same rollout's returns."""
    model = agent(n_critic_updates=3, critic_kfac_kwargs={"lr": 0.05})
    start = copy.deepcopy(model.policy)
    model.learn(N_ENVS * N_STEPS)
    batch = next(model.rollout_buffer.get(batch_size=None))

    critic = nn.Sequential(start.mlp_extractor.value_net, start.value_net)
    once = {"factor_update_steps": 3, "inv_update_steps": 3}  # once per update
    optimizer = KFAC(critic, **{**CRITIC_KFAC_DEFAULTS, **once, "lr": 0.05})
    losses = []
    for _ in range(3):
        values = critic(batch.observations).flatten()
        if optimizer.capture_due:  # the exact Gauss-Newton statistics
            optimizer.capture_backward(values.mean())
        loss = F.mse_loss(batch.returns, values)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the regression makes progress
    trained = dict(model.policy.named_parameters())
    for name, p in start.named_parameters():
        if is_critic(name):
            torch.testing.assert_close(trained[name], p, rtol=1e-5, atol=1e-6)


def test_the_critic_optimizer_is_saved_and_loaded(tmp_path) -> None:  # noqa: ANN001
    model = agent(n_critic_updates=2)
    model.learn(2 * N_ENVS * N_STEPS)
    model.save(tmp_path / "agent.zip")
    loaded = ACKTR.load(tmp_path / "agent.zip", env=model.env)
    assert loaded.critic_optimizer is not None and model.critic_optimizer is not None
    assert loaded.critic_optimizer.steps == model.critic_optimizer.steps == 4
    for name, block in model.critic_optimizer.blocks.items():
        torch.testing.assert_close(
            loaded.critic_optimizer.blocks[name].to_dense(), block.to_dense()
        )
    assert set(loaded.policy.optimizer.blocks) == set(model.policy.optimizer.blocks)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_critic_updates": -1}, "Invalid n_critic_updates"),
        ({"n_critic_updates": 2, "trust_region": "split"}, "Invalid trust_region"),
        ({"critic_kfac_kwargs": {"lr": 1e-2}}, "Invalid critic_kfac_kwargs"),
        ({"n_critic_updates": 2, "critic_kfac_kwargs": {"nope": 1}}, "Invalid K-FAC option"),
        ({"n_critic_updates": 2, "critic_kfac_kwargs": {"lr": -1.0}}, "Invalid lr"),
    ],
)
def test_bad_critic_arguments_are_value_errors_naming_them(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        agent(**kwargs)


def test_the_critic_statistics_are_the_exact_gauss_newton_ones() -> None:
    """Backpropagating 1 per example gives the exact Fisher of the unit-variance value
    head: its last layer's Kronecker block equals that layer's block of the exact Fisher."""
    model = agent(n_critic_updates=1)
    start = copy.deepcopy(model.policy)
    model.learn(N_ENVS * N_STEPS)
    batch = next(model.rollout_buffer.get(batch_size=None))
    critic = nn.Sequential(start.mlp_extractor.value_net, start.value_net).double()
    exact = exact_fisher(critic, batch.observations.double(), "gaussian")
    index = layer_indices(critic, "1").reshape(-1)
    assert model.critic_optimizer is not None
    block = model.critic_optimizer.blocks["value_net"].to_dense()
    torch.testing.assert_close(block.double(), exact[index][:, index], rtol=1e-4, atol=1e-6)
