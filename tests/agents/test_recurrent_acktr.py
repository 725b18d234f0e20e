"""Recurrent ACKTR: the training pass replays the rollout exactly (hidden states carried
across rollouts and reset at episode starts), every LSTM map has a K-FAC block, the
statistics of a layer run once per step are those of one run over all rows, and a saved
agent resumes with its factors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from stable_baselines3.common.callbacks import CallbackList
from torch import nn

from ngrl.agents import RecurrentACKTR
from ngrl.envs import make_vec_env
from ngrl.optim import KFAC, CurvatureFallbackWarning
from tests.helpers.oracle import capture_batch, sample_classes

SMALL = dict(lstm_hidden_size=16, net_arch=dict(pi=[16], vf=[16]))


def agent(**kwargs: object) -> RecurrentACKTR:
    env = make_vec_env("CartPoleNoVel", 4, seed=0)
    options = dict(n_steps=24, seed=0, policy_kwargs=SMALL, cold_start_steps=1) | kwargs
    return RecurrentACKTR("MlpLstmPolicy", env, **options)  # type: ignore[arg-type]


def test_every_lstm_map_gets_a_kfac_block_and_nothing_falls_back() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvatureFallbackWarning)
        model = agent()
    optimizer = model.policy.optimizer
    assert optimizer.fallbacks == {}
    for lstm in ("lstm_actor", "lstm_critic"):
        for part in ("ih", "hh"):
            assert optimizer.blocks[f"{lstm}.{part}_l0"].shape[0] == 4 * 16


def test_the_training_pass_replays_the_rollout_values_and_log_probabilities() -> None:
    model = agent()
    model.learn(4 * 24 * 3)  # three rollouts: states carried over, episodes end inside
    buffer = model.rollout_buffer
    assert buffer.episode_starts[1:].any(), "the check needs episode starts inside the rollout"
    # A fresh rollout with the current parameters, then the training pass over it.
    callback = CallbackList([])
    callback.init_callback(model)
    model.collect_rollouts(model.env, callback, buffer, model.n_steps)
    (batch,) = model._training_batches()
    with torch.no_grad():
        distribution, values = model._forward(batch)
    n_envs = model.n_envs
    recorded_values = torch.as_tensor(buffer.values.swapaxes(0, 1).reshape(-1))
    recorded_log_probs = torch.as_tensor(buffer.log_probs.swapaxes(0, 1).reshape(-1))
    torch.testing.assert_close(values.flatten(), recorded_values, rtol=1e-5, atol=1e-5)
    log_probs = distribution.log_prob(batch.actions.long().flatten())
    torch.testing.assert_close(log_probs, recorded_log_probs, rtol=1e-5, atol=1e-5)
    assert batch.observations.shape[0] == n_envs * model.n_steps


def test_a_layer_run_once_per_step_has_the_statistics_of_one_run_over_all_rows() -> None:
    """``capture(examples=N·T)``: the mean loss averages over every row, not the N rows a
    per-step call sees."""
    torch.manual_seed(0)
    layer, head = nn.Linear(3, 4), nn.Linear(4, 2)
    per_step = nn.Sequential(layer, head)
    whole = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    whole.load_state_dict(per_step.state_dict())
    x = torch.randn(5, 6, 3)  # N = 5 sequences of T = 6 steps
    targets = sample_classes(whole(x.reshape(30, 3)))
    reference = KFAC(whole)
    capture_batch(reference, whole, x.reshape(30, 3), targets)
    stepped = KFAC(per_step)
    logits = torch.stack([per_step(x[:, t]) for t in range(6)], 1).reshape(30, 2)
    with stepped.capture(examples=30):
        F.cross_entropy(logits, targets).backward()
    for name in ("0", "1"):
        torch.testing.assert_close(
            stepped.blocks[name].to_dense(), reference.blocks[name].to_dense()
        )
    with pytest.raises(ValueError, match="Invalid examples value: 0"), stepped.capture(examples=0):
        pass


def test_a_saved_agent_resumes_with_its_factors(tmp_path) -> None:  # noqa: ANN001
    model = agent()
    model.learn(4 * 24 * 3)
    model.save(tmp_path / "agent.zip")
    loaded = RecurrentACKTR.load(tmp_path / "agent.zip", env=model.env)
    for name, block in model.policy.optimizer.blocks.items():
        torch.testing.assert_close(
            loaded.policy.optimizer.blocks[name].to_dense(), block.to_dense()
        )
    hidden = loaded._last_lstm_states.pi[0]
    assert hidden.shape == (1, 4, 16) and not hidden.any()  # a new episode's state
    loaded.learn(4 * 24, reset_num_timesteps=False)
    assert loaded.num_timesteps == 4 * 24 * 4
