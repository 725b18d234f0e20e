"""A gymnasium vector environment seen through Stable-Baselines3's ``VecEnv`` API.

SB3's contract (that of its ``DummyVecEnv`` over ``Monitor``-wrapped envs): ``step_wait``
returns ``(obs, rewards, dones, infos)`` with ``dones = terminated | truncated``; for an env
that finished, ``obs`` is already the first observation of its next episode, its info holds
``terminal_observation`` (the last observation of the finished one, needed to bootstrap a
truncated episode), ``TimeLimit.truncated`` (truncated and not terminated) and ``episode``
(``r`` return, ``l`` length, ``t`` seconds since the adapter was made). gymnasium's vector
envs give the same data in ``SAME_STEP`` autoreset mode, packed as arrays; this adapter
unpacks it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices

__all__ = ["GymnasiumVecEnv"]

_PACKED_KEYS = ("final_obs", "final_info")


def _unpack(infos: dict[str, Any], n_envs: int) -> list[dict[str, Any]]:
    """gymnasium's packed info dict (arrays plus ``_key`` masks) as one dict per env."""
    out: list[dict[str, Any]] = [{} for _ in range(n_envs)]
    for key, values in infos.items():
        if key.startswith("_") or key in _PACKED_KEYS:
            continue
        mask = infos.get(f"_{key}", np.ones(n_envs, dtype=bool))
        per_env = _unpack(values, n_envs) if isinstance(values, dict) else values
        for i in np.flatnonzero(mask):
            out[i][key] = per_env[i]
    return out


class GymnasiumVecEnv(VecEnv):
    """SB3 ``VecEnv`` over a gymnasium ``VectorEnv`` made with ``AutoresetMode.SAME_STEP``.

    Args:
        env: the vector environment (sync or async).
        seeds: one seed per sub-environment, used at the next ``reset()``.
        indices: the sub-environments' global indices over all ranks (default
            ``0, 1, …``); ``seed(s)`` gives sub-environment ``i`` the seed ``s + indices[i]``,
            so ranks seeded alike still get disjoint seeds.
    """

    def __init__(
        self,
        env: VectorEnv,
        seeds: Sequence[int] | None = None,
        indices: Sequence[int] | None = None,
    ) -> None:
        mode = env.metadata.get("autoreset_mode")
        if mode is not None and mode != AutoresetMode.SAME_STEP:
            raise ValueError(
                f"GymnasiumVecEnv needs autoreset_mode=SAME_STEP, got {mode}; make the "
                "vector env with vector_kwargs={'autoreset_mode': AutoresetMode.SAME_STEP}"
            )
        self.env = env  # before VecEnv.__init__, which reads attributes through get_attr
        super().__init__(env.num_envs, env.single_observation_space, env.single_action_space)
        self._seeds: list[int | None] = list(seeds) if seeds is not None else [None] * env.num_envs
        self._global_indices = list(indices) if indices is not None else list(range(env.num_envs))
        if len(self._global_indices) != env.num_envs:
            raise ValueError(
                f"Invalid indices: {len(self._global_indices)} for {env.num_envs} environments"
            )
        self._actions: np.ndarray | None = None
        self._returns = np.zeros(self.num_envs)
        self._lengths = np.zeros(self.num_envs, dtype=np.int64)
        self._start = time.time()

    def _reset_seeds(self, seeds: list[int]) -> Any:
        """The seeds in the form the wrapped vector env's ``reset`` takes."""
        return seeds

    def reset(self) -> np.ndarray:
        seeds = None if any(s is None for s in self._seeds) else self._reset_seeds(self._seeds)  # type: ignore[arg-type]
        obs, infos = self.env.reset(seed=seeds)
        self._seeds = [None] * self.num_envs
        self.reset_infos = _unpack(infos, self.num_envs)
        self._returns[:] = 0.0
        self._lengths[:] = 0
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        obs, rewards, dones, infos, _ = self._step()
        return obs, rewards.astype(np.float32), dones, infos

    def _step(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]], dict]:
        """One step: observations, raw rewards, dones, SB3 infos, and gymnasium's packed
        infos (whose entries for a finished env describe its new episode)."""
        assert self._actions is not None, "step_wait() without step_async()"
        obs, rewards, terminated, truncated, infos = self.env.step(self._actions)
        self._actions = None
        dones = np.logical_or(terminated, truncated)
        per_env = _unpack(infos, self.num_envs)
        final_infos = _unpack(infos.get("final_info", {}), self.num_envs)
        self._returns += rewards
        self._lengths += 1
        for i in np.flatnonzero(dones):
            # The info of a finished env is its last step's, as in DummyVecEnv.
            per_env[i] = dict(final_infos[i])
            per_env[i]["terminal_observation"] = infos["final_obs"][i]
            per_env[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
            per_env[i]["episode"] = {
                "r": round(float(self._returns[i]), 6),
                "l": int(self._lengths[i]),
                "t": round(time.time() - self._start, 6),
            }
            self._returns[i] = 0.0
            self._lengths[i] = 0
        return obs, rewards, dones, per_env, infos

    def close(self) -> None:
        self.env.close()

    # --- SB3's attribute plumbing ------------------------------------------------------
    def _indices(self, indices: VecEnvIndices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        if isinstance(indices, int):
            return [indices]
        return list(indices)

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        try:
            values = list(self.env.get_attr(attr_name))
        except (AttributeError, NotImplementedError):
            # Vector envs without per-env attributes (ale-py's): the vector env's own.
            values = [getattr(self.env, attr_name)] * self.num_envs
        return [values[i] for i in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        if indices is not None:
            raise NotImplementedError("gymnasium vector envs set an attribute on every env")
        self.env.set_attr(attr_name, value)

    def env_method(
        self, method_name: str, *args: Any, indices: VecEnvIndices = None, **kwargs: Any
    ) -> list[Any]:
        values = self.env.call(method_name, *args, **kwargs)
        return [values[i] for i in self._indices(indices)]

    def env_is_wrapped(
        self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None
    ) -> list[bool]:
        # SB3 asks whether Monitor is present, to know if episode statistics exist:
        # this adapter reports them itself.
        from stable_baselines3.common.monitor import Monitor

        return [wrapper_class is Monitor for _ in self._indices(indices)]

    def seed(self, seed: int | None = None) -> Sequence[None | int]:
        if seed is None:
            seed = int(np.random.randint(0, 2**31 - 1))
        self._seeds = [seed + i for i in self._global_indices]
        return list(self._seeds)

    def get_images(self) -> Sequence[np.ndarray | None]:
        return list(self.env.render() or [None] * self.num_envs)  # type: ignore[arg-type]
