"""Classic-control tasks without their velocities: the standard check that a policy has
memory (rl-zoo3's ``*NoVel`` environments). Velocities are zeroed, the observation keeps
its shape; a memory-less policy cannot balance ``CartPoleNoVel`` or swing up
``PendulumNoVel``, a recurrent one can infer the velocities from the history.

Importing this module registers ``CartPoleNoVel-v1`` and ``PendulumNoVel-v1`` with
gymnasium (short names ``CartPoleNoVel`` and ``PendulumNoVel``).
"""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium as gym
import numpy as np

__all__ = ["MASKED", "VelocityMasked"]

#: The masked tasks: id → (the full-state task, the kept entries of its observation).
MASKED: dict[str, tuple[str, tuple[float, ...]]] = {
    # CartPole: (x, ẋ, θ, θ̇) → (x, 0, θ, 0)
    "CartPoleNoVel-v1": ("CartPole-v1", (1.0, 0.0, 1.0, 0.0)),
    # Pendulum: (cos θ, sin θ, θ̇) → (cos θ, sin θ, 0)
    "PendulumNoVel-v1": ("Pendulum-v1", (1.0, 1.0, 0.0)),
}


class VelocityMasked(gym.ObservationWrapper):
    """Multiplies each observation by a 0/1 ``mask`` (rl-zoo3's ``MaskVelocityWrapper``).

    Args:
        env: a task with a flat ``Box`` observation.
        mask: one entry per observation entry: 1 keeps it, 0 zeroes it.
    """

    def __init__(self, env: gym.Env, mask: Sequence[float]) -> None:
        super().__init__(env)
        space = env.observation_space
        if not isinstance(space, gym.spaces.Box) or space.shape != (len(mask),):
            raise ValueError(f"Invalid mask: {len(mask)} entries for an observation space {space}")
        if np.any((space.low > 0) | (space.high < 0)):
            raise ValueError(f"Invalid env: zero is outside its observation space {space}")
        self.mask = np.asarray(mask, dtype=space.dtype)  # the space stays: zero is in it

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return observation * self.mask


def make_masked(masked_id: str, **kwargs: object) -> gym.Env:
    """The task ``masked_id`` of :data:`MASKED` (gymnasium's entry point)."""
    full, mask = MASKED[masked_id]
    return VelocityMasked(gym.make(full, **kwargs), mask)


for _masked_id, (_full, _) in MASKED.items():
    if _masked_id not in gym.registry:
        gym.register(
            _masked_id,
            entry_point="ngrl.envs.masked:make_masked",
            kwargs={"masked_id": _masked_id},
            max_episode_steps=None,  # the full task's TimeLimit wraps it already
        )
