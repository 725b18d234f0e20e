"""make_vec_env gives SB3 VecEnvs that behave exactly like SB3's own DummyVecEnv."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import A2C
from stable_baselines3.common.env_util import make_vec_env as sb3_make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

from ngrl.envs import make_vec_env


def run_both(ours: VecEnv, reference: VecEnv, steps: int, seed: int = 0) -> list[tuple]:
    """Step both with the same random actions; assert they agree; return their episodes."""
    rng = np.random.default_rng(seed)
    np.testing.assert_allclose(ours.reset(), reference.reset())
    episodes = []
    for _ in range(steps):
        actions = np.array([reference.action_space.sample() for _ in range(ours.num_envs)])
        if actions.dtype.kind == "i":
            actions = rng.integers(0, reference.action_space.n, ours.num_envs)
        ours_out, ref_out = ours.step(actions), reference.step(actions)
        np.testing.assert_allclose(ours_out[0], ref_out[0], rtol=1e-6)
        np.testing.assert_allclose(ours_out[1], ref_out[1], rtol=1e-6)
        np.testing.assert_array_equal(ours_out[2], ref_out[2])
        assert ours_out[1].dtype == np.float32 and ours_out[2].dtype == bool
        for i in np.flatnonzero(ref_out[2]):
            mine, theirs = ours_out[3][i], ref_out[3][i]
            np.testing.assert_allclose(mine["terminal_observation"], theirs["terminal_observation"])
            assert mine["TimeLimit.truncated"] == theirs["TimeLimit.truncated"]
            assert (mine["episode"]["r"], mine["episode"]["l"]) == (
                theirs["episode"]["r"],
                theirs["episode"]["l"],
            )
            episodes.append((mine["episode"]["r"], mine["TimeLimit.truncated"]))
    ours.close()
    reference.close()
    return episodes


@pytest.mark.parametrize("vectorization", ["sync", "async"])
def test_cartpole_matches_sb3_dummy_vec_env(vectorization: str) -> None:
    ours = make_vec_env("CartPole", 4, seed=7, vectorization=vectorization)
    reference = sb3_make_vec_env("CartPole-v1", n_envs=4, seed=7, vec_env_cls=DummyVecEnv)
    episodes = run_both(ours, reference, 300)
    assert len(episodes) > 20


def test_truncated_episodes_carry_their_bootstrap_observation() -> None:
    ours = make_vec_env("Pendulum", 2, seed=3, vectorization="sync")
    reference = sb3_make_vec_env("Pendulum-v1", n_envs=2, seed=3, vec_env_cls=DummyVecEnv)
    episodes = run_both(ours, reference, 201)
    assert episodes and all(truncated for _, truncated in episodes)  # 200-step time limit


def test_rank_gets_its_slice_with_its_seeds() -> None:
    ours = make_vec_env("CartPole", 8, seed=0, rank=1, world_size=4)
    assert ours.num_envs == 2
    reference = DummyVecEnv([lambda: __import__("gymnasium").make("CartPole-v1")] * 2)
    reference.seed(2)  # global envs 2 and 3 of 8 on 4 ranks: seeds 2 and 3
    np.testing.assert_allclose(ours.reset(), reference.reset())
    # SB3 reseeds a model's env with the run's seed: the rank keeps its global seeds.
    assert ours.seed(10) == [12, 13]
    reference.seed(12)
    np.testing.assert_allclose(ours.reset(), reference.reset())
    ours.close()


def test_mujoco_steps_and_sb3_learns_on_it() -> None:
    env = make_vec_env("HalfCheetah", 2, seed=0, vectorization="sync")
    obs = env.reset()
    assert obs.shape == (2, 17) and env.observation_space.contains(obs[0].astype(np.float64))
    A2C("MlpPolicy", env, n_steps=8, seed=0, device="cpu").learn(32)
    env.close()


def test_bad_vectorization_is_named() -> None:
    with pytest.raises(ValueError, match="Invalid vectorization"):
        make_vec_env("CartPole", 2, vectorization="threads")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "n_envs"), [("Breakout", 16), ("HalfCheetah", 8), ("CartPole", 8)]
)
def test_the_documented_calls_return_working_vec_envs(name: str, n_envs: int) -> None:
    env = make_vec_env(name, n_envs, 0)
    obs = env.reset()
    assert obs.shape[0] == n_envs
    actions = np.array([env.action_space.sample() for _ in range(n_envs)])
    _, rewards, dones, infos = env.step(actions)
    assert rewards.shape == dones.shape == (n_envs,) and len(infos) == n_envs
    env.close()


class CrashingEnv(gym.Env):
    """Steps fine twice, then raises: a worker that dies must not hang the learner."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,))
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple:
        super().reset(seed=seed)
        self.steps = 0
        return np.zeros(2, dtype=np.float32), {}

    def step(self, action: int) -> tuple:
        self.steps += 1
        if self.steps > 2:
            raise RuntimeError("the simulator crashed")
        return np.zeros(2, dtype=np.float32), 0.0, False, False, {}


@pytest.mark.filterwarnings("ignore:.*(Worker|error|Raising).*:UserWarning")
def test_a_crashing_subprocess_env_raises_instead_of_hanging() -> None:
    gym.register("ngrl-test/Crashing-v0", entry_point=CrashingEnv)
    env = make_vec_env("ngrl-test/Crashing-v0", 2, seed=0, vectorization="async")
    env.reset()
    with pytest.raises(Exception, match="crashed|RuntimeError"):
        for _ in range(5):
            env.step(np.zeros(2, dtype=np.int64))
    env.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": -1}, "Invalid seed value: -1"),
        ({"rank": 0, "world_size": 3}, "do not divide evenly over 3 ranks"),
    ],
)
def test_bad_seeds_and_uneven_shards_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_vec_env("CartPole", 8, **kwargs)
