"""RL agents on ngrl: ACKTR and natural policy gradient as Stable-Baselines3 algorithms.

Imports ngrl, envs and stable_baselines3, never the reverse::

    from agents import ACKTR
    model = ACKTR("CnnPolicy", env).learn(10_000_000)
"""

from agents.acktr import ACKTR
from agents.npg import NPG
from agents.policies import (
    KFACActorCriticCnnPolicy,
    KFACActorCriticPolicy,
    KFACMultiInputActorCriticPolicy,
)

__all__ = [
    "ACKTR",
    "NPG",
    "KFACActorCriticCnnPolicy",
    "KFACActorCriticPolicy",
    "KFACMultiInputActorCriticPolicy",
]
