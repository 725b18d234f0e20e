"""Run a function on several CPU ranks (gloo), each in its own spawned process."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

__all__ = ["run_ranks"]


def _entry(
    fn: Callable[..., Any],
    rank: int,
    world: int,
    store: str,
    out: str,
    timeout: float,
    args: tuple[Any, ...],
) -> None:
    result: dict[str, Any]
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout),
        )
        result = {"value": fn(rank, world, *args)}
    except BaseException as error:  # reported to the test, which decides
        result = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
    with open(out, "wb") as handle:
        pickle.dump(result, handle)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a dead peer makes the teardown fail too
            pass


def run_ranks(
    fn: Callable[..., Any],
    world: int,
    tmp_path: Path,
    *args: Any,
    timeout: float = 60.0,
    join_timeout: float = 120.0,
) -> list[dict[str, Any] | None]:
    """``fn(rank, world, *args)`` on ``world`` ranks; per rank ``{"value": ...}``,
    ``{"error": ..., "trace": ...}``, or ``None`` if the process wrote nothing (died)."""
    context = mp.get_context("spawn")
    store = tmp_path / "store"
    outs = [tmp_path / f"rank{r}.pkl" for r in range(world)]
    processes = [
        context.Process(target=_entry, args=(fn, r, world, str(store), str(outs[r]), timeout, args))
        for r in range(world)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(join_timeout)
    alive = [p for p in processes if p.is_alive()]
    for process in alive:
        process.kill()
    assert not alive, f"{len(alive)} rank(s) still running after {join_timeout} s: a hang"
    results: list[dict[str, Any] | None] = []
    for out in outs:
        if out.exists():
            with open(out, "rb") as handle:
                results.append(pickle.load(handle))
        else:
            results.append(None)
    return results
