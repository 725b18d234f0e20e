"""Environment names, vectorized rollouts and per-rank sharding (Atari, MuJoCo, classic).

Imports gymnasium and ale_py, never ngrl's optimizers. Built so far (issue 3): names
(``resolve``) and rank sharding (``rank_info``, ``shard``); vectorized rollouts follow.
"""

from envs.names import EnvSpec, known_names, resolve
from envs.ranks import RankInfo, Shard, rank_info, shard

__all__ = ["EnvSpec", "RankInfo", "Shard", "known_names", "rank_info", "resolve", "shard"]
