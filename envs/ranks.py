"""Which environments and seeds belong to which rank under torchrun."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["RankInfo", "Shard", "rank_info", "shard"]


@dataclass(frozen=True)
class RankInfo:
    """This process's place in a torchrun job (``rank=0, world_size=1`` when alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1


def rank_info(environ: Mapping[str, str] | None = None) -> RankInfo:
    """Read torchrun's ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (all optional)."""
    environ = os.environ if environ is None else environ
    values = {}
    for key, default in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)):
        raw = environ.get(key)
        try:
            values[key] = default if raw is None else int(raw)
        except ValueError:
            raise ValueError(f"Invalid {key}={raw!r} in the environment: not an integer") from None
    info = RankInfo(values["RANK"], values["LOCAL_RANK"], values["WORLD_SIZE"])
    if info.world_size < 1 or not 0 <= info.rank < info.world_size or info.local_rank < 0:
        raise ValueError(
            f"Invalid torchrun variables: RANK={info.rank}, LOCAL_RANK={info.local_rank}, "
            f"WORLD_SIZE={info.world_size}"
        )
    return info


@dataclass(frozen=True)
class Shard:
    """One rank's slice of ``n_envs`` environments: global indices and their seeds."""

    indices: tuple[int, ...]
    seeds: tuple[int, ...]

    @property
    def n_envs(self) -> int:
        return len(self.indices)


def shard(n_envs: int, seed: int, rank: int = 0, world_size: int = 1) -> Shard:
    """Split ``n_envs`` environments over ``world_size`` ranks as evenly as possible.

    Environment ``i`` (a global index) gets seed ``seed + i`` wherever it runs, so the
    ranks' seeds are disjoint and a job's environments are the same for any world size.
    """
    if n_envs < 1:
        raise ValueError(f"Invalid n_envs value: {n_envs} (must be >= 1)")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"Invalid rank {rank} for world_size {world_size}")
    if n_envs < world_size:
        raise ValueError(
            f"Invalid n_envs value: {n_envs} environments cannot be split over "
            f"{world_size} ranks (each rank needs at least one)"
        )
    base, extra = divmod(n_envs, world_size)
    start = rank * base + min(rank, extra)
    indices = tuple(range(start, start + base + (1 if rank < extra else 0)))
    return Shard(indices, tuple(seed + i for i in indices))
