"""Environment names, vectorized rollouts and per-rank sharding (Atari, MuJoCo, classic).

Imports gymnasium, ale_py and SB3's VecEnv, never ngrl's optimizers::

    from ngrl.envs import make_vec_env
    env = make_vec_env("Breakout", 16, seed=0)   # an SB3 VecEnv of this rank's envs
"""

from ngrl.envs.make import make_vec_env
from ngrl.envs.names import EnvSpec, known_names, resolve
from ngrl.envs.ranks import RankInfo, Shard, rank_info, shard

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
