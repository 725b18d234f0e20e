"""Environment names, vectorized rollouts and per-rank sharding (Atari, MuJoCo, classic).

Imports gymnasium, ale_py and SB3's VecEnv, never ngrl's optimizers. Built so far
(issue 3): names (``resolve``), rank sharding (``rank_info``, ``shard``) and
``make_vec_env`` for MuJoCo, classic control and any gymnasium id; Atari's vector
environment follows.
"""

from envs.make import make_vec_env
from envs.names import EnvSpec, known_names, resolve
from envs.ranks import RankInfo, Shard, rank_info, shard

__all__ = [
    "EnvSpec",
    "RankInfo",
    "Shard",
    "known_names",
    "make_vec_env",
    "rank_info",
    "resolve",
    "shard",
]
