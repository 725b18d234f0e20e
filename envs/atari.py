"""Atari through ale-py's C++ vector environment, with SB3's AtariWrapper semantics.

ale-py's ``AtariVectorEnv`` does the standard DQN/A2C preprocessing in C++ threads: no-op
starts, frame skip 4 with max-pooling, 84×84 grey frames, a stack of 4, fire on reset.
Two parts of the training recipe are done here instead:

* **Episodic life.** ale-py's own ``episodic_life=True`` ends *and resets the game* at
  every life loss (ale-py 0.12), so an agent would only ever play its first life. SB3's
  ``EpisodicLifeEnv`` signals ``done`` on a life loss and lets the game go on; this
  adapter does the same: when ``lives`` drops, the env reports ``done`` with the current
  observation as ``terminal_observation`` and keeps playing.
* **FIRE after a life loss**, in games that need FIRE to go on (``FIRE`` is action 1, as
  baselines' and SB3's ``FireResetEnv`` test): the published wrappers press it in the
  reset that follows every life loss, so a policy that stops pressing FIRE cannot stall
  the game until the frame limit. The C++ vector env steps every env at once, so the
  press replaces the agent's next action in that env (which the game ignores anyway
  until the ball is served).
* **Reward clipping** to ``sign(r)`` for training, while ``info["episode"]["r"]`` is the
  raw game score of the whole game (all lives), so logs show real scores.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from ale_py import Action, ALEInterface, AtariVectorEnv, LoggerMode, roms
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

from ngrl.envs.sb3_adapter import GymnasiumVecEnv

__all__ = ["AtariVecEnv", "ale_vector_env", "needs_fire", "wrapper_vector_env"]

FIRE = 1  # the index of FIRE in the minimal action set of every game that has it


@cache
def needs_fire(game: str) -> bool:
    """Whether ``game`` (ale-py's ROM id) needs FIRE to start play: its minimal action set
    has FIRE at index 1 and at least 3 actions (baselines' ``FireResetEnv`` condition)."""
    ale = ALEInterface()
    ale.setLoggerMode(LoggerMode.Error)
    ale.loadROM(roms.get_rom_path(game))
    actions = ale.getMinimalActionSet()
    return len(actions) >= 3 and actions[FIRE] == Action.FIRE


def ale_vector_env(game: str, n_envs: int, *, num_threads: int = 0, **ale_kwargs: Any) -> VectorEnv:
    """ale-py's C++ vector env (the fast path), set up for :class:`AtariVecEnv`.

    ``ale_kwargs`` are further ``AtariVectorEnv`` options (``frameskip``, ``stack_num``,
    ``noop_max``, ``use_fire_reset``, ``repeat_action_probability``, …).
    """
    return AtariVectorEnv(
        game,
        n_envs,
        num_threads=num_threads,
        autoreset_mode="SameStep",
        episodic_life=False,
        reward_clipping=False,
        **ale_kwargs,
    )


def wrapper_vector_env(
    gym_id: str,
    n_envs: int,
    *,
    vectorization: Literal["sync", "async"] = "sync",
    noop_max: int = 30,
    frame_skip: int = 4,
    screen_size: int = 84,
    stack_num: int = 4,
    repeat_action_probability: float = 0.0,
) -> VectorEnv:
    """The same preprocessing from gymnasium's wrappers (the fallback and test reference).

    ``AtariPreprocessing`` (no-op starts, frame skip with max-pool, grey, resize) and
    ``FrameStackObservation``, in a gymnasium vector env. It has no fire-on-reset; the
    fast path fires on reset by default (``use_fire_reset``).
    """

    def make_one(env: gym.Env) -> gym.Env:
        env = AtariPreprocessing(
            env, noop_max=noop_max, frame_skip=frame_skip, screen_size=screen_size
        )
        return FrameStackObservation(env, stack_num)

    return gym.make_vec(
        gym_id,
        n_envs,
        vectorization_mode=vectorization,
        vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP},
        wrappers=[make_one],
        frameskip=1,
        repeat_action_probability=repeat_action_probability,
    )


class AtariVecEnv(GymnasiumVecEnv):
    """SB3 ``VecEnv`` over an Atari vector env reporting ``lives`` (see the module docstring).

    Args:
        env: from :func:`ale_vector_env` (fast) or :func:`wrapper_vector_env`.
        seeds: one seed per environment.
        episodic_life: end training episodes at every life loss (not the game).
        clip_rewards: return ``sign(r)`` as the reward.
        fire_on_life_loss: press FIRE at the step after each life loss (the agent's
            action there is replaced). Only for games that need it (:func:`needs_fire`);
            ``False`` leaves serving to the agent.
    """

    def __init__(
        self,
        env: VectorEnv,
        seeds: list[int] | tuple[int, ...],
        indices: list[int] | tuple[int, ...] | None = None,
        *,
        episodic_life: bool = True,
        clip_rewards: bool = True,
        fire_on_life_loss: bool = False,
    ) -> None:
        super().__init__(env, seeds, indices)
        self.episodic_life = episodic_life
        self.clip_rewards = clip_rewards
        self.fire_on_life_loss = fire_on_life_loss
        self._lives = np.zeros(self.num_envs, dtype=np.int64)
        self._fire_next = np.zeros(self.num_envs, dtype=bool)

    def _reset_seeds(self, seeds: list[int]) -> Any:
        if isinstance(self.env, AtariVectorEnv):
            return np.asarray(seeds, dtype=np.int64)  # ale-py takes an array, not a list
        return seeds

    def reset(self) -> np.ndarray:
        obs = super().reset()
        self._lives = np.array([info.get("lives", 0) for info in self.reset_infos])
        self._fire_next[:] = False
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        if self._fire_next.any():
            actions = np.array(actions, copy=True)
            actions[self._fire_next] = FIRE
        super().step_async(actions)

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        obs, raw, game_over, infos, packed = self._step()
        # For a finished game, the packed `lives` are already those of the new game.
        lives = np.asarray(packed["lives"])
        dones = game_over.copy()
        life_lost = (lives < self._lives) & ~game_over
        self._fire_next = life_lost & self.fire_on_life_loss
        if self.episodic_life:
            for i in np.flatnonzero(life_lost):
                infos[i]["terminal_observation"] = obs[i]
                infos[i]["TimeLimit.truncated"] = False
            dones |= life_lost
        self._lives = lives
        rewards = np.sign(raw) if self.clip_rewards else raw
        return obs, rewards.astype(np.float32), dones, infos
