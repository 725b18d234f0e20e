"""Data-parallel K-FAC on 2 CPU ranks (gloo), against one process on the union batch."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ngrl import KFAC, fisher_divergence
from ngrl.distributed import (
    DistributedError,
    WorkPlan,
    all_agree,
    finish,
    is_distributed,
    rank,
    world_size,
)
from tests.helpers.distributed import run_ranks

STEPS = 5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)
    ).double()


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(n, 5, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=generator),
        )
        for _ in range(STEPS)
    ]


def _train(part: slice, options: dict[str, Any]) -> dict[str, torch.Tensor]:
    """STEPS K-FAC steps on ``part`` of each batch; parameters and factors after."""
    model = _model()
    opt = KFAC(
        model,
        lr=0.1,
        damping=0.05,
        kl_clip=1e-2,
        momentum=0.5,
        factor_decay=0.8,
        inv_update_steps=2,
        **options,
    )
    for x, y in _batches(16):
        opt.zero_grad()
        logits = model(x[part])
        with opt.capture():
            nn.functional.cross_entropy(logits, y[part]).backward(retain_graph=True)
        # With cg_steps, the exact curvature of the rank's part, whose Hessian-vector
        # products are averaged over the ranks like the gradients.
        opt.step(divergence=fisher_divergence(logits, "categorical") if opt.cg_steps else None)
    result = {f"param.{k}": v.detach().clone() for k, v in model.named_parameters()}
    for name, block in opt.blocks.items():
        result.update({f"{name}.{k}": v for k, v in block.state_dict().items()})
    return result


#: The K-FAC options run on two ranks, all in the same two spawned processes.
OPTIONS: dict[str, dict[str, Any]] = {
    "all-workers": {},  # every rank receives every decomposition
    "one-worker-factored": {
        "grad_worker_fraction": 0.5,
        "curvature_options": {"damping_rule": "factored"},
    },
    "tkfac": {"curvature": "tkfac"},
    "conjugate-gradient": {"cg_steps": 3, "grad_worker_fraction": 0.5},
}


def _unsupported() -> str:
    """The error of a curvature whose statistics cannot be averaged over ranks."""
    model = _model()
    opt = KFAC(model, curvature="ekfac")
    x, y = _batches(4)[0]
    try:
        with opt.capture():
            nn.functional.cross_entropy(model(x), y).backward()
    except ValueError as error:
        return str(error)
    return "no error"


def _rank_worker(rank_: int, world: int) -> dict[str, Any]:
    assert is_distributed() and rank() == rank_ and world_size() == world
    half = 16 // world
    part = slice(rank_ * half, (rank_ + 1) * half)
    results: dict[str, Any] = {name: _train(part, options) for name, options in OPTIONS.items()}
    results["unsupported"] = _unsupported()
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    results = run_ranks(_rank_worker, 2, tmp_path_factory.mktemp("ranks"))
    for result in results:
        assert result is not None and "value" in result, result and result.get("trace")
    return [r["value"] for r in results]  # type: ignore[index]


@pytest.mark.parametrize("name", list(OPTIONS))
def test_two_ranks_match_one_process_on_the_union_batch(
    two_ranks: list[dict[str, Any]], name: str
) -> None:
    rank0, rank1 = (ranks[name] for ranks in two_ranks)
    union = _train(slice(None), OPTIONS[name])
    assert rank0.keys() == rank1.keys() == union.keys()
    for key in union:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between the ranks"
        torch.testing.assert_close(rank0[key], union[key], rtol=1e-9, atol=1e-12, msg=key)
    # The ranks did move: the test would pass trivially on an untrained model otherwise.
    untouched = {k: v for k, v in _model().named_parameters()}
    assert not torch.allclose(union["param.0.weight"], untouched["0.weight"])


def test_curvature_that_cannot_be_averaged_is_refused(two_ranks: list[dict[str, Any]]) -> None:
    for ranks in two_ranks:
        assert "ekfac" in ranks["unsupported"] and "kfac" in ranks["unsupported"]


def _dying_worker(rank_: int, world: int) -> str:
    model = _model()
    opt = KFAC(model)
    x, y = _batches(4)[0]
    if rank_ == 1:
        os._exit(1)  # a crash: no teardown, no message
    with opt.capture():
        nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return "finished"


def test_a_dead_rank_stops_the_other_with_an_error_not_a_hang(tmp_path: Path) -> None:
    results = run_ranks(_dying_worker, 2, tmp_path, timeout=20.0, join_timeout=90.0)
    assert results[1] is None
    assert results[0] is not None and "error" in results[0], results[0]
    assert results[0]["error"].startswith(DistributedError.__name__)
    assert "rank 0 of 2" in results[0]["error"]


def _finishing_worker(rank_: int, world: int, folder: str) -> str:
    all_agree(True)  # a collective just before the end, as a training run has
    sys.stdout = open(Path(folder, f"rank{rank_}.txt"), "w")  # noqa: SIM115 (finish closes)
    print(f"rank {rank_} reports", end="")  # still buffered when finish() ends the process
    finish(3)
    return "went on"


def test_finish_ends_the_other_ranks_at_once_and_rank_0_goes_on(tmp_path: Path) -> None:
    results = run_ranks(_finishing_worker, 2, tmp_path, str(tmp_path))
    assert results[0] == {"value": "went on"}
    assert results[1] is None  # rank 1 ended inside finish(), before returning a result
    assert (tmp_path / "rank1.txt").read_text() == "rank 1 reports"  # flushed, not lost
    assert not is_distributed()
    finish(3)  # without a process group: nothing to do, and this process goes on


def test_work_plan_balances_inverses_and_groups_ranks() -> None:
    costs = {"a": 8.0, "b": 5.0, "c": 4.0, "d": 1.0}
    plan = WorkPlan.build(costs, world=2, grad_worker_fraction=1.0)
    assert plan.owners == {"a": 0, "b": 1, "c": 1, "d": 0}
    assert plan.column(0) == [0, 1] and plan.row(1) == [1]
    hybrid = WorkPlan.build(costs, world=4, grad_worker_fraction=0.5)
    assert hybrid.grad_workers == 2 and hybrid.columns == 2
    assert hybrid.column(3) == [1, 3] and hybrid.row(3) == [2, 3]
    # Layer "b" is owned by rank 1: ranks 1 and 3 precondition it, and each row has one.
    assert hybrid.owners["b"] == 1
    assert [r for r in range(4) if hybrid.is_grad_worker("b", r)] == [1, 3]
    assert hybrid.grad_worker_in_row("b", 0) == 1 and hybrid.grad_worker_in_row("b", 2) == 3
    with pytest.raises(ValueError, match="grad_worker_fraction"):
        WorkPlan.build(costs, world=3, grad_worker_fraction=0.5)
    with pytest.raises(ValueError, match="grad_worker_fraction"):
        KFAC(_model(), grad_worker_fraction=0.0)


def test_without_a_process_group_nothing_changes() -> None:
    assert not is_distributed() and rank() == 0 and world_size() == 1
