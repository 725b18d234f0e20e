"""Scoring a trained agent on fresh environments, the same way everywhere."""

from __future__ import annotations

from typing import Any

import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecNormalize

from ngrl.envs import make_vec_env, resolve

__all__ = ["evaluate"]


def evaluate(model: BaseAlgorithm, env_name: str, episodes: int, seed: int) -> dict[str, Any]:
    """Returns and lengths of ``episodes`` episodes on environments seeded from ``seed``.

    A ``VecNormalize`` training environment lends its observation statistics, frozen.
    Atari agents are scored with the stochastic policy (rl-zoo3's convention), the others
    with the deterministic one. Atari returns are whole-game raw scores (envs' episode info).
    """
    spec = resolve(env_name)
    env = make_vec_env(
        spec.gym_id, min(episodes, 8), seed=seed, rank=0, world_size=1
    )  # one process
    train_env = model.get_env()
    if isinstance(train_env, VecNormalize):
        env = VecNormalize(env, training=False, norm_reward=False)
        env.obs_rms = train_env.obs_rms
    deterministic = spec.family != "atari"
    try:
        returns, lengths = evaluate_policy(
            model,
            env,
            n_eval_episodes=episodes,
            deterministic=deterministic,
            return_episode_rewards=True,
        )
    finally:
        env.close()
    return {
        "episodes": episodes,
        "deterministic": deterministic,
        "mean_return": float(np.mean(returns)),
        "std_return": float(np.std(returns)),
        "returns": [float(r) for r in returns],
        "lengths": [int(n) for n in lengths],
    }
