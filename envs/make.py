"""``make_vec_env``: a name in, an SB3 ``VecEnv`` of this rank's environments out."""

from __future__ import annotations

import os
from typing import Any, Literal

import gymnasium as gym
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env import VecEnv, VecNormalize

from ngrl.envs.atari import AtariVecEnv, ale_vector_env, needs_fire, wrapper_vector_env
from ngrl.envs.names import resolve
from ngrl.envs.ranks import rank_info, shard
from ngrl.envs.sb3_adapter import GymnasiumVecEnv

__all__ = ["make_vec_env"]

Vectorization = Literal["auto", "sync", "async"]


def make_vec_env(
    name: str,
    n_envs: int,
    seed: int = 0,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    vectorization: Vectorization = "auto",
    normalize: bool = False,
    atari_backend: Literal["ale", "wrappers"] = "ale",
    **env_kwargs: Any,
) -> VecEnv:
    """This rank's share of ``n_envs`` environments called ``name``, as an SB3 ``VecEnv``.

    Args:
        name: a short name (``CartPole``, ``HalfCheetah``) or a full gymnasium id.
        n_envs: environments over all ranks, a multiple of the number of ranks; this rank
            gets its slice (:func:`ngrl.envs.shard`).
        seed: environment ``i`` (global index) is seeded with ``seed + i`` (``seed >= 0``).
        rank, world_size: default to torchrun's variables (one process: 0 and 1).
        vectorization: ``"async"`` (subprocesses, shared memory), ``"sync"`` (in
            process), or ``"auto"``: async for MuJoCo with several environments on a
            machine with more than 2 cores, sync otherwise (see docs/benchmarks.md).
        normalize: wrap in SB3's ``VecNormalize`` (running observation and reward
            normalisation, as the MuJoCo recipes use).
        atari_backend: ``"ale"`` (ale-py's C++ vector env, threads) or ``"wrappers"``
            (gymnasium's AtariPreprocessing and frame stack: the fallback and the test
            reference; ``vectorization`` applies to it).
        env_kwargs: passed to ``gymnasium.make`` for every environment; for Atari,
            ``episodic_life``, ``clip_rewards`` and ``fire_on_life_loss`` (default ``True``:
            FIRE after each life loss in games that need it; :class:`ngrl.envs.atari.AtariVecEnv`) and
            the backend's options (:func:`ngrl.envs.atari.ale_vector_env`,
            :func:`ngrl.envs.atari.wrapper_vector_env`).
    """
    spec = resolve(name)
    if atari_backend not in ("ale", "wrappers"):
        raise ValueError(
            f"Invalid atari_backend value: {atari_backend!r} (use 'ale' or 'wrappers')"
        )
    if vectorization not in ("auto", "sync", "async"):
        raise ValueError(
            f"Invalid vectorization value: {vectorization!r} (use 'auto', 'sync' or 'async')"
        )
    info = rank_info()
    rank = info.rank if rank is None else rank
    world_size = info.world_size if world_size is None else world_size
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Invalid seed value: {seed!r} (an integer >= 0)")
    if world_size > 1 and n_envs % world_size:
        raise ValueError(
            f"Invalid n_envs value: {n_envs} environments do not divide evenly over "
            f"{world_size} ranks (the ranks' batches are averaged with equal weights)"
        )
    part = shard(n_envs, seed, rank, world_size)
    if spec.family == "atari":
        assert spec.game is not None
        life = {k: env_kwargs.pop(k) for k in ("episodic_life", "clip_rewards") if k in env_kwargs}
        life["fire_on_life_loss"] = env_kwargs.pop("fire_on_life_loss", True) and needs_fire(
            spec.game
        )
        if atari_backend == "ale":
            vector = ale_vector_env(spec.game, part.n_envs, **env_kwargs)
        else:
            mode = "sync" if vectorization == "auto" else vectorization
            vector = wrapper_vector_env(spec.gym_id, part.n_envs, vectorization=mode, **env_kwargs)
        atari: VecEnv = AtariVecEnv(vector, part.seeds, part.indices, **life)
        return VecNormalize(atari, norm_obs=False) if normalize else atari
    if vectorization == "auto":
        # Measured (docs/benchmarks.md): subprocesses only pay off for environments that
        # are expensive to step, given cores to run them; CartPole is 5× faster in process
        # and HalfCheetah 2× faster on 2 cores.
        parallel = spec.family == "mujoco" and part.n_envs > 1 and (os.cpu_count() or 1) > 2
        vectorization = "async" if parallel else "sync"
    vector_kwargs: dict[str, Any] = {"autoreset_mode": AutoresetMode.SAME_STEP}
    if vectorization == "async":
        vector_kwargs["shared_memory"] = True
    env = gym.make_vec(
        spec.gym_id,
        part.n_envs,
        vectorization_mode=vectorization,
        vector_kwargs=vector_kwargs,
        **env_kwargs,
    )
    vec_env: VecEnv = GymnasiumVecEnv(env, part.seeds, part.indices)
    return VecNormalize(vec_env) if normalize else vec_env
