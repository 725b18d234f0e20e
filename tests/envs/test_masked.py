"""The classic tasks without velocities: the full task's dynamics, the velocities zeroed."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from ngrl.envs import make_vec_env, resolve
from ngrl.envs.masked import MASKED, VelocityMasked


@pytest.mark.parametrize("masked_id", MASKED)
def test_the_masked_task_is_the_full_task_with_its_velocities_zeroed(masked_id: str) -> None:
    full_id, mask = MASKED[masked_id]
    masked, full = gym.make(masked_id), gym.make(full_id)
    observation, _ = masked.reset(seed=3)
    reference, _ = full.reset(seed=3)
    np.testing.assert_array_equal(observation, reference * np.asarray(mask, np.float32))
    for _ in range(5):
        action = full.action_space.sample()
        observation = masked.step(action)[0]
        reference = full.step(action)[0]
        np.testing.assert_array_equal(observation, reference * np.asarray(mask, np.float32))
        assert observation[np.asarray(mask) == 0].tolist() == [0.0] * mask.count(0.0)
    assert masked.spec is not None and masked.spec.max_episode_steps == full.spec.max_episode_steps


def test_short_names_and_vectorized_envs() -> None:
    assert resolve("CartPoleNoVel").gym_id == "CartPoleNoVel-v1"
    assert resolve("pendulumnovel").family == "classic"
    env = make_vec_env("CartPoleNoVel", 2, seed=0)
    assert env.reset()[:, [1, 3]].tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_a_mask_that_does_not_fit_is_refused() -> None:
    with pytest.raises(ValueError, match="3 entries"):
        VelocityMasked(gym.make("CartPole-v1"), (1.0, 0.0, 1.0))
