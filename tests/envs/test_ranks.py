"""torchrun variables and the per-rank slice of environments and seeds."""

from __future__ import annotations

import pytest

from ngrl.envs import rank_info, shard


def test_rank_info_reads_torchrun_variables() -> None:
    info = rank_info({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (info.rank, info.local_rank, info.world_size) == (3, 1, 4)
    assert rank_info({}) == rank_info({"RANK": "0", "WORLD_SIZE": "1"})


@pytest.mark.parametrize(
    "environ",
    [{"RANK": "two"}, {"RANK": "4", "WORLD_SIZE": "4"}, {"WORLD_SIZE": "0"}],
)
def test_bad_torchrun_variables_are_named(environ: dict) -> None:
    with pytest.raises(ValueError, match="Invalid"):
        rank_info(environ)


@pytest.mark.parametrize(("n_envs", "world_size"), [(16, 1), (16, 4), (10, 3), (3, 3)])
def test_shards_cover_every_env_once_with_disjoint_seeds(n_envs: int, world_size: int) -> None:
    shards = [shard(n_envs, 100, rank, world_size) for rank in range(world_size)]
    indices = [i for s in shards for i in s.indices]
    seeds = [x for s in shards for x in s.seeds]
    assert indices == list(range(n_envs))
    assert seeds == [100 + i for i in range(n_envs)]
    assert max(s.n_envs for s in shards) - min(s.n_envs for s in shards) <= 1


def test_impossible_splits_are_refused() -> None:
    with pytest.raises(ValueError, match="n_envs"):
        shard(2, 0, 0, 4)
    with pytest.raises(ValueError, match="rank"):
        shard(8, 0, 4, 4)
