"""Atari through ale-py's vector env: SB3's episodic-life and reward-clipping semantics,
raw game scores in the episode info, seeds."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.spaces import Discrete

from ngrl.envs import make_vec_env
from ngrl.envs.atari import FIRE, needs_fire


def test_breakout_16_envs_is_an_sb3_vec_env_of_stacked_frames() -> None:
    env = make_vec_env("Breakout", 16, seed=0)
    obs = env.reset()
    assert obs.shape == (16, 4, 84, 84) and obs.dtype == np.uint8
    assert env.action_space == Discrete(4) and env.observation_space.contains(obs[0])
    obs, rewards, dones, infos = env.step(np.zeros(16, dtype=np.int64))
    assert rewards.dtype == np.float32 and dones.dtype == bool and len(infos) == 16
    env.close()


def play(env, steps: int, seed: int = 0) -> list[tuple]:
    """Random play; returns (step, env, reward, done, info, info_before) events."""
    rng = np.random.default_rng(seed)
    env.reset()
    before = [{} for _ in range(env.num_envs)]
    events = []
    for step in range(steps):
        _, rewards, dones, infos = env.step(rng.integers(0, env.action_space.n, env.num_envs))
        for i in range(env.num_envs):
            events.append((step, i, float(rewards[i]), bool(dones[i]), infos[i], before[i]))
        before = infos
    env.close()
    return events


def test_a_life_loss_ends_the_training_episode_but_not_the_game() -> None:
    events = play(make_vec_env("Breakout", 2, seed=1), 400)
    life_losses = [e for e in events if e[3] and "episode" not in e[4]]
    assert life_losses
    for _, _, _, _, info, before in life_losses:
        assert info["TimeLimit.truncated"] is False and "terminal_observation" in info
        assert info["lives"] == before["lives"] - 1
        assert info["episode_frame_number"] > before["episode_frame_number"]  # no reset


def test_episode_info_holds_the_raw_score_of_the_whole_game() -> None:
    events = play(make_vec_env("Breakout", 2, seed=2, clip_rewards=False), 1500)
    totals = [0.0, 0.0]
    games = 0
    for _, i, reward, done, info, _ in events:
        totals[i] += reward
        if done and "episode" in info:
            assert info["episode"]["r"] == pytest.approx(totals[i])
            assert info["episode"]["l"] > 100  # five lives, not one
            totals[i] = 0.0
            games += 1
    assert games >= 2


def test_training_rewards_are_clipped() -> None:
    events = play(make_vec_env("Breakout", 2, seed=2), 1500)
    assert {e[2] for e in events} <= {-1.0, 0.0, 1.0}


def test_seeds_follow_the_global_env_index() -> None:
    sliced = make_vec_env("Breakout", 4, seed=0, rank=1, world_size=2)  # envs 2, 3
    alone = make_vec_env("Breakout", 2, seed=2)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(sliced.reset(), alone.reset())
    for _ in range(50):
        actions = rng.integers(0, 4, 2)
        np.testing.assert_array_equal(sliced.step(actions)[0], alone.step(actions)[0])
    sliced.close()
    alone.close()


def test_fast_path_matches_the_gymnasium_wrapper_reference() -> None:
    """Same seeds and actions through ale-py's C++ preprocessing and through gymnasium's
    AtariPreprocessing + FrameStackObservation (no-op starts and fire-on-reset off, as the
    wrappers have no fire reset): identical rewards, dones, life losses and scores, and
    identical frames once the stack holds only frames of the current episode. The one
    documented difference is how the stack is padded right after a reset."""
    kwargs = dict(noop_max=0, clip_rewards=False)
    fast = make_vec_env("Breakout", 2, seed=4, use_fire_reset=False, **kwargs)
    reference = make_vec_env("Breakout", 2, seed=4, atari_backend="wrappers", **kwargs)
    rng = np.random.default_rng(0)
    fast_obs, ref_obs = fast.reset(), reference.reset()
    np.testing.assert_array_equal(fast_obs[:, -1], ref_obs[:, -1])  # the newest frame
    since_reset = np.zeros(2, dtype=int)
    games = 0
    for _ in range(600):
        actions = rng.integers(0, 4, 2)
        fast_obs, fast_r, fast_d, fast_i = fast.step(actions)
        ref_obs, ref_r, ref_d, ref_i = reference.step(actions)
        np.testing.assert_array_equal(fast_r, ref_r)
        np.testing.assert_array_equal(fast_d, ref_d)
        np.testing.assert_array_equal(fast_obs[:, -1], ref_obs[:, -1])
        since_reset += 1
        for i in range(2):
            if "episode" in fast_i[i]:
                assert fast_i[i]["episode"]["r"] == ref_i[i]["episode"]["r"]
                since_reset[i] = 0
                games += 1
            elif since_reset[i] >= 4:
                np.testing.assert_array_equal(fast_obs[i], ref_obs[i])
    assert games >= 2
    fast.close()
    reference.close()


def _noop_play(env, steps: int) -> tuple[int, int, np.ndarray]:
    """A NOOP-only policy: (life losses, finished games, lives at the end)."""
    env.reset()
    losses = games = 0
    for _ in range(steps):
        _, _, dones, infos = env.step(np.zeros(env.num_envs, dtype=np.int64))
        losses += int(dones.sum())
        games += sum("episode" in info for info in infos)
    lives = np.array([info["lives"] for info in infos])
    env.close()
    return losses, games, lives


def test_fire_after_a_life_loss_keeps_a_noop_policy_losing_lives() -> None:
    """baselines' and SB3's wrappers press FIRE after every life loss: a NOOP-only policy
    keeps losing lives and finishing games instead of stalling after its first life."""
    losses, games, _ = _noop_play(make_vec_env("Breakout", 2, seed=0), 1500)
    assert games >= 4 and losses >= 5 * games


def test_without_fire_after_a_life_loss_a_noop_policy_stalls() -> None:
    losses, games, lives = _noop_play(
        make_vec_env("Breakout", 2, seed=0, fire_on_life_loss=False), 1500
    )
    assert games == 0 and losses == 2 and (lives == 4).all()


def test_the_fire_press_replaces_the_agent_action_only_after_a_life_loss() -> None:
    env = make_vec_env("Breakout", 2, seed=5)
    sent: list[np.ndarray] = []
    step = env.env.step
    env.env.step = lambda actions: (sent.append(np.array(actions)), step(actions))[1]
    env.reset()
    rng = np.random.default_rng(0)
    chosen, life_lost = [], []
    for _ in range(600):
        actions = rng.integers(0, 4, 2)
        _, _, dones, infos = env.step(actions)
        chosen.append(actions)
        life_lost.append(dones & np.array(["episode" not in info for info in infos]))
    env.close()
    expected = np.array(chosen)
    after_loss = np.zeros_like(expected, dtype=bool)
    after_loss[1:] = np.array(life_lost)[:-1]
    expected[after_loss] = FIRE
    assert after_loss.sum() >= 4
    np.testing.assert_array_equal(np.array(sent), expected)


def test_games_need_fire_as_the_published_wrappers_decide() -> None:
    assert needs_fire("breakout") and needs_fire("pong")
    assert not needs_fire("freeway")  # NOOP, UP, DOWN
