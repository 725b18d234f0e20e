"""RL agents on ngrl: ACKTR and natural policy gradient as Stable-Baselines3 algorithms.

Imports ngrl, envs and stable_baselines3, never the reverse::

    from ngrl.agents import ACKTR
    model = ACKTR("CnnPolicy", env).learn(10_000_000)
"""

from ngrl.agents.acktr import ACKTR
from ngrl.agents.npg import NPG
from ngrl.agents.policies import (
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
