"""Atari through ale-py's C++ vector environment, with SB3's AtariWrapper semantics.

ale-py's ``AtariVectorEnv`` does the standard DQN/A2C preprocessing in C++ threads: no-op
starts, frame skip 4 with max-pooling, 84×84 grey frames, a stack of 4, fire on reset.
Two parts of the training recipe are done here instead:

* **Episodic life.** ale-py's own ``episodic_life=True`` ends *and resets the game* at
  every life loss (ale-py 0.12), so an agent would only ever play its first life. SB3's
  ``EpisodicLifeEnv`` signals ``done`` on a life loss and lets the game go on; this
  adapter does the same: when ``lives`` drops, the env reports ``done`` with the current
  observation as ``terminal_observation`` and keeps playing.
* **Reward clipping** to ``sign(r)`` for training, while ``info["episode"]["r"]`` is the
  raw game score of the whole game (all lives), so logs show real scores.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ale_py import AtariVectorEnv

from envs.sb3_adapter import GymnasiumVecEnv

__all__ = ["AtariVecEnv"]


class AtariVecEnv(GymnasiumVecEnv):
    """SB3 ``VecEnv`` over ale-py's ``AtariVectorEnv`` (see the module docstring).

    Args:
        game: ale-py ROM id, e.g. ``"breakout"``.
        seeds: one seed per environment.
        episodic_life: end training episodes at every life loss (not the game).
        clip_rewards: return ``sign(r)`` as the reward.
        num_threads: emulator threads (0: one per environment, up to the core count).
        ale_kwargs: further ``AtariVectorEnv`` options (``frameskip``, ``stack_num``,
            ``noop_max``, ``repeat_action_probability``, ``full_action_space``, …).
    """

    def __init__(
        self,
        game: str,
        seeds: list[int] | tuple[int, ...],
        *,
        episodic_life: bool = True,
        clip_rewards: bool = True,
        num_threads: int = 0,
        **ale_kwargs: Any,
    ) -> None:
        env = AtariVectorEnv(
            game,
            len(seeds),
            num_threads=num_threads,
            autoreset_mode="SameStep",
            episodic_life=False,
            reward_clipping=False,
            **ale_kwargs,
        )
        super().__init__(env, seeds)
        self.episodic_life = episodic_life
        self.clip_rewards = clip_rewards
        self._lives = np.zeros(self.num_envs, dtype=np.int64)

    def _reset_seeds(self, seeds: list[int]) -> np.ndarray:
        return np.asarray(seeds, dtype=np.int64)  # ale-py takes an array, not a list

    def reset(self) -> np.ndarray:
        obs = super().reset()
        self._lives = np.array([info.get("lives", 0) for info in self.reset_infos])
        return obs

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        obs, raw, game_over, infos, packed = self._step()
        # For a finished game, the packed `lives` are already those of the new game.
        lives = np.asarray(packed["lives"])
        dones = game_over.copy()
        if self.episodic_life:
            life_lost = (lives < self._lives) & ~game_over
            for i in np.flatnonzero(life_lost):
                infos[i]["terminal_observation"] = obs[i]
                infos[i]["TimeLimit.truncated"] = False
            dones |= life_lost
        self._lives = lives
        rewards = np.sign(raw) if self.clip_rewards else raw
        return obs, rewards.astype(np.float32), dones, infos
