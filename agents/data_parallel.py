"""What an SB3 on-policy algorithm needs under torchrun beyond K-FAC's own averaging.

K-FAC averages gradients and curvature statistics itself (:mod:`ngrl.distributed`). The
algorithm must also count every rank's environment steps, so that schedules, the stopping
point and checkpoints refer to the whole job (and a run can resume on another number of
ranks), and keep the ranks' observation normalisers identical.
"""

from __future__ import annotations

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecEnv, VecNormalize

from ngrl.distributed import all_reduce_mean, is_distributed, world_size

__all__ = ["GlobalTimesteps", "merge_running_stats"]


def _moments(stats: RunningMeanStd) -> list[np.ndarray]:
    """``(count, count·mean, count·(var + mean²))``: the sums that parallel updates add."""
    count = np.asarray(stats.count, dtype=np.float64)
    return [count, count * stats.mean, count * (stats.var + np.square(stats.mean))]


def merge_running_stats(stats: RunningMeanStd, base: list[np.ndarray]) -> list[np.ndarray]:
    """Add every rank's updates since ``base`` (the moments at the last merge) to ``stats``.

    Returns the new base. Each rank's statistics are ``base + its own updates``; the sum of
    the ranks' moments minus ``(world − 1)·base`` is the statistics of all the data.
    """
    local = _moments(stats)
    deltas = [
        torch.from_numpy(np.asarray(m - b, dtype=np.float64))
        for m, b in zip(local, base, strict=True)
    ]
    all_reduce_mean(deltas)  # the mean over ranks; times world is the sum
    merged = [b + world_size() * d.numpy() for b, d in zip(base, deltas, strict=True)]
    count, first, second = merged
    stats.count = float(count)
    stats.mean = first / count
    stats.var = np.maximum(second / count - np.square(stats.mean), 0.0)
    return merged


class GlobalTimesteps(BaseCallback):
    """Under torchrun: ``num_timesteps`` counts the environment steps of all ranks, and a
    ``VecNormalize`` environment's statistics are merged over the ranks after each rollout.

    Every rank steps the same number of environments (the CLI insists), so each local step
    stands for ``world_size`` of them. Put it first among the callbacks.
    """

    def __init__(self) -> None:
        super().__init__()
        self._bases: dict[str, list[np.ndarray]] = {}

    def _normalizer(self) -> VecNormalize | None:
        env: VecEnv | None = self.training_env
        while env is not None and not isinstance(env, VecNormalize):
            env = getattr(env, "venv", None)
        return env

    def _on_training_start(self) -> None:
        normalizer = self._normalizer()
        if normalizer is not None:
            self._bases = {
                "obs": _moments(normalizer.obs_rms) if normalizer.norm_obs else [],
                "ret": _moments(normalizer.ret_rms) if normalizer.norm_reward else [],
            }

    def _on_step(self) -> bool:
        if is_distributed():
            self.model.num_timesteps += (world_size() - 1) * self.training_env.num_envs
        return True

    def _on_rollout_end(self) -> None:
        normalizer = self._normalizer()
        if normalizer is None or not is_distributed():
            return
        if self._bases.get("obs"):
            assert isinstance(normalizer.obs_rms, RunningMeanStd)  # dict observations: not yet
            self._bases["obs"] = merge_running_stats(normalizer.obs_rms, self._bases["obs"])
        if self._bases.get("ret"):
            self._bases["ret"] = merge_running_stats(normalizer.ret_rms, self._bases["ret"])
