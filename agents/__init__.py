"""RL agents on ngrl: ACKTR (also with LSTM policies) and natural policy gradient as
Stable-Baselines3 algorithms.

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
from ngrl.agents.recurrent import RecurrentACKTR

__all__ = [
    "ACKTR",
    "NPG",
    "RecurrentACKTR",
    "KFACActorCriticCnnPolicy",
    "KFACActorCriticPolicy",
    "KFACMultiInputActorCriticPolicy",
]
