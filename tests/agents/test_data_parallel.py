"""ACKTR on 2 CPU ranks (gloo): identical learners, global step counts, merged normalisers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from stable_baselines3.common.running_mean_std import RunningMeanStd

from ngrl.agents import ACKTR
from ngrl.agents.data_parallel import merge_running_stats
from ngrl.envs import make_vec_env
from tests.helpers.distributed import run_ranks


def _acktr_worker(rank: int, world: int, timesteps: int) -> dict:
    env = make_vec_env("CartPole", 4, seed=3, rank=rank, world_size=world)
    model = ACKTR("MlpPolicy", env, n_steps=8, seed=rank, cold_start_steps=2, device="cpu")
    initial = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model.learn(timesteps)
    factors = model.policy.optimizer.state_dict()["state"]
    return {
        "initial": initial,
        "params": {k: v.clone() for k, v in model.policy.state_dict().items()},
        "factors": {
            f"{i}.{k}": v
            for i, entry in factors.items()
            for k, v in entry.items()
            if isinstance(v, torch.Tensor)
        },
        "timesteps": model.num_timesteps,
        "updates": model._n_updates,
    }


def test_two_ranks_take_identical_steps_and_count_all_steps(tmp_path: Path) -> None:
    # 4 environments, 2 per rank, 8 steps: 32 timesteps per update; 8 updates (2 cold).
    results = run_ranks(_acktr_worker, 2, tmp_path, 256)
    for result in results:
        assert result is not None and "value" in result, result and result.get("trace")
    rank0, rank1 = (r["value"] for r in results)  # type: ignore[index]
    # Different seeds built different networks; rank 0's were broadcast to both.
    for key, value in rank0["initial"].items():
        assert torch.equal(value, rank1["initial"][key]), key
    for key, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][key]), f"{key} differs between the ranks"
    assert any(not torch.equal(v, rank0["initial"][k]) for k, v in rank0["params"].items())
    assert rank0["factors"] and all(
        torch.equal(v, rank1["factors"][k]) for k, v in rank0["factors"].items()
    )
    assert rank0["timesteps"] == rank1["timesteps"] == 256  # both ranks' steps
    assert rank0["updates"] == rank1["updates"] == 8


def _normalizer_worker(rank: int, world: int) -> tuple:
    rng = np.random.default_rng(rank)
    stats = RunningMeanStd(shape=(3,))
    common = np.arange(12.0).reshape(4, 3)
    stats.update(common)
    base = [
        np.asarray(stats.count),
        stats.count * stats.mean,
        stats.count * (stats.var + stats.mean**2),
    ]
    local = rng.normal(size=(5 + rank, 3)) * (rank + 1)
    stats.update(local)
    merge_running_stats(stats, base)
    return stats.mean, stats.var, stats.count, local


def test_normalisers_merge_to_the_statistics_of_all_data(tmp_path: Path) -> None:
    results = run_ranks(_normalizer_worker, 2, tmp_path)
    values = [r["value"] for r in results]  # type: ignore[index]
    reference = RunningMeanStd(shape=(3,))
    reference.update(np.arange(12.0).reshape(4, 3))
    reference.update(np.concatenate([v[3] for v in values]))
    for mean, var, count, _ in values:
        np.testing.assert_allclose(mean, reference.mean, rtol=1e-10)
        np.testing.assert_allclose(var, reference.var, rtol=1e-10)
        assert count == reference.count
