"""Data-parallel K-FAC over ``torch.distributed``: averaged statistics, shared inverses.

Every rank holds the whole model and its own slice of the data. When a process group is
initialised (``torchrun``; gloo on CPUs, NCCL on GPUs), :class:`ngrl.optim.KFAC` calls
into this module so that the ranks stay identical:

* **gradients** are averaged before each step, all of them in one flat all-reduce;
* **curvature statistics** are averaged after each commit, in one flat all-reduce. The
  running statistics of the blocks that support it (:attr:`CurvatureBlock.data_parallel`)
  are exponential averages of batch statistics, so averaging them after the commit equals
  committing the statistics of the union batch when the ranks' batches are equal;
* **inverses** (KAISA, Pauloski et al. 2021, arXiv:2107.01739): each layer's
  eigendecomposition is computed by one rank, its *inverse worker*, chosen greedily by
  cost, and sent to the layer's *gradient workers*. ``grad_worker_fraction`` ``f`` sets
  how many ranks those are, ``max(1, round(f·world))``: with ``f = 1`` every rank
  receives every decomposition and preconditions locally (least communication per
  step); with ``f = 1/world`` only the inverse worker keeps it and broadcasts the
  preconditioned gradient every step (least memory); values between trade the two.

Without a process group every function here is a no-op and :func:`world_size` is 1.
A collective that fails because another rank died or timed out raises
:class:`DistributedError`, naming this rank, instead of hanging or dumping a backend trace.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:
    from ngrl.curvature.base import CurvatureBlock

__all__ = [
    "DistributedError",
    "Groups",
    "WorkPlan",
    "all_agree",
    "all_reduce_mean",
    "average_gradients",
    "broadcast_module",
    "broadcast_object",
    "broadcast_tensors",
    "check_grad_worker_fraction",
    "finish",
    "is_distributed",
    "rank",
    "LocalPlan",
    "KaisaPlan",
    "make_plan",
    "world_size",
]

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or disagreed."""


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def finish(code: int | None = None) -> None:
    """Destroy the process group (nothing to do without one); with an exit status ``code``,
    a rank other than 0 then ends its process at once with it.

    That rank leaves without finalising the interpreter. Gloo's worker threads free a
    collective's tensors a moment after the collective has returned; a worker that needs the
    GIL for that while the interpreter is shutting down aborts the process
    (``std::terminate``, about 1 in 40 two-rank runs on 2 busy cores), turning a finished
    run into a failed one. Rank 0 alone writes files and outlives the others' teardown.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    follower = dist.get_rank() != 0
    dist.destroy_process_group()
    if follower and code is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn a backend failure (a dead or hung peer) into one clear :class:`DistributedError`."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as error:  # gloo/NCCL errors, timeouts (DistBackendError is one)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise DistributedError(
            f"rank {rank()} of {world_size()}: {what} failed; another rank has probably "
            f"died or stopped responding ({first_line})"
        ) from error


def _wire(tensor: Tensor) -> Tensor:
    """``tensor`` where the backend can send it: NCCL takes only CUDA tensors."""
    if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def _buckets(tensors: Iterable[Tensor]) -> dict[tuple[torch.dtype, torch.device], list[Tensor]]:
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for tensor in tensors:
        buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    return buckets


def _unflatten(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    """Copy consecutive slices of ``flat`` back into ``tensors`` (on their own device)."""
    flat = flat.to(tensors[0].device)
    offset = 0
    for tensor in tensors:
        size = tensor.numel()
        tensor.copy_(flat[offset : offset + size].view_as(tensor))
        offset += size


def check_grad_worker_fraction(value: float) -> float:
    """``value`` if it is a valid ``grad_worker_fraction`` (in ``(0, 1]``)."""
    if not 0.0 < value <= 1.0:
        raise ValueError(f"Invalid grad_worker_fraction value: {value} (in (0, 1])")
    return float(value)


def all_reduce_mean(tensors: Sequence[Tensor]) -> None:
    """Replace each tensor by its mean over the ranks, in place.

    The tensors are flattened into one buffer per dtype and device, so a call is one
    all-reduce in the usual case (everything float32 on one device), not one per tensor.
    """
    if not is_distributed() or not tensors:
        return
    count = world_size()
    for group in _buckets(tensors).values():
        flat = _wire(torch.cat([t.reshape(-1) for t in group]))
        with _collective("averaging across ranks (all-reduce)"):
            dist.all_reduce(flat)
        _unflatten(flat.div_(count), group)


def average_gradients(params: Iterable[Tensor]) -> None:
    """Average ``p.grad`` over the ranks for every parameter that has one (one all-reduce)."""
    all_reduce_mean([p.grad for p in params if p.grad is not None])


def broadcast_tensors(tensors: Sequence[Tensor], src: int, group: Any = None) -> None:
    """Overwrite ``tensors`` on every rank of ``group`` with ``src``'s, one call per dtype."""
    if not is_distributed() or not tensors:
        return
    for bucket in _buckets(tensors).values():
        flat = _wire(torch.cat([t.reshape(-1) for t in bucket]))
        with _collective(f"receiving tensors from rank {src} (broadcast)"):
            dist.broadcast(flat, src, group=group)
        _unflatten(flat, bucket)


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s parameters and buffers (identical initial models)."""
    with torch.no_grad():
        broadcast_tensors([*module.parameters(), *module.buffers()], src)


def broadcast_object(value: T, src: int, group: Any = None) -> T:
    """``src``'s picklable ``value`` on every rank of ``group`` (small metadata only)."""
    if not is_distributed():
        return value
    box = [value]
    with _collective(f"receiving metadata from rank {src}"):
        dist.broadcast_object_list(box, src, group=group)
    return box[0]


def all_agree(ok: bool) -> bool:
    """``True`` on every rank when ``ok`` holds on every rank (a logical AND)."""
    if not is_distributed():
        return ok
    flag = _wire(torch.tensor([1 if ok else 0], dtype=torch.int64))
    with _collective("agreeing with the other ranks"):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


# --- KAISA's assignment of inverses and preconditioning to ranks ---------------------------
@dataclass(frozen=True)
class WorkPlan:
    """Which rank decomposes each layer's curvature, and which ranks precondition it.

    The ranks form a ``grad_workers × columns`` grid (``columns = world / grad_workers``),
    rank ``r`` in column ``r mod columns``. A column is a *gradient-worker group*: the
    inverse worker of a layer sends its decomposition to the other ranks of its column,
    and they all precondition that layer. A row (``r // columns``) is a *receiver group*:
    it holds exactly one gradient worker of every layer, which sends it the layer's
    preconditioned gradient.
    """

    world: int
    grad_workers: int
    owners: Mapping[str, int]

    @property
    def columns(self) -> int:
        return self.world // self.grad_workers

    def column(self, rank: int) -> list[int]:
        return list(range(rank % self.columns, self.world, self.columns))

    def row(self, rank: int) -> list[int]:
        start = (rank // self.columns) * self.columns
        return list(range(start, start + self.columns))

    def is_grad_worker(self, name: str, rank: int) -> bool:
        """Whether ``rank`` preconditions layer ``name`` (it holds its decomposition)."""
        return rank % self.columns == self.owners[name] % self.columns

    def grad_worker_in_row(self, name: str, rank: int) -> int:
        """The rank of ``rank``'s row that preconditions layer ``name``."""
        return (rank // self.columns) * self.columns + self.owners[name] % self.columns

    @classmethod
    def build(cls, costs: Mapping[str, float], world: int, grad_worker_fraction: float) -> WorkPlan:
        """Assign each layer to the least-loaded rank, most expensive layers first."""
        check_grad_worker_fraction(grad_worker_fraction)
        workers = max(1, round(grad_worker_fraction * world))
        if world % workers:
            raise ValueError(
                f"Invalid grad_worker_fraction value: {grad_worker_fraction} gives "
                f"{workers} gradient workers, which do not divide {world} ranks"
            )
        load = [0.0] * world
        owners: dict[str, int] = {}
        for name in sorted(costs, key=lambda n: (-costs[n], n)):
            owner = min(range(world), key=lambda r: (load[r], r))
            owners[name] = owner
            load[owner] += costs[name]
        return cls(world, workers, owners)


class Groups:
    """The process groups of a :class:`WorkPlan` (every rank creates every group, in order)."""

    def __init__(self, plan: WorkPlan) -> None:
        self.plan = plan
        self._column: dict[int, Any] = {}
        self._row: dict[int, Any] = {}
        columns, workers = plan.columns, plan.grad_workers
        for c in range(columns):
            self._column[c] = self._new_group(plan.column(c))
        for r in range(workers):
            self._row[r] = self._new_group(plan.row(r * columns))

    def _new_group(self, ranks: list[int]) -> Any:
        if len(ranks) == 1:
            return None  # nothing to send within a single rank
        if len(ranks) == self.plan.world:
            return dist.group.WORLD
        with _collective("creating a process group"):
            return dist.new_group(ranks)

    def column_of(self, rank: int) -> Any:
        return self._column[rank % self.plan.columns]

    def row_of(self, rank: int) -> Any:
        return self._row[rank // self.plan.columns]


# --- the work plan of a K-FAC step ------------------------------------------------------
class LocalPlan:
    """Who does what in a K-FAC step, for one process: every block refreshes and
    preconditions itself and nothing is sent. :class:`ngrl.optim.KFAC` always goes through
    a plan, so that its step reads the same with and without ``torch.distributed``."""

    def agree(self, ok: bool) -> bool:
        """``ok`` on every rank, when it holds on every rank."""
        return ok

    def average_gradients(self, params: Iterable[Tensor]) -> None:
        """Make ``p.grad`` the same on every rank."""

    def average_statistics(self, blocks: Iterable[CurvatureBlock]) -> None:
        """Make the blocks' running statistics the same on every rank (after a commit)."""

    def refresh(self, blocks: Mapping[str, CurvatureBlock], damping: float) -> None:
        """Recompute the decompositions of ``blocks``."""
        for block in blocks.values():
            block.refresh(damping)

    def preconditioned_here(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The gradients this rank preconditions itself (all of them, for one process)."""
        return dict(grads)

    def gather_directions(
        self, directions: Mapping[str, Tensor], grads: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Every layer's preconditioned gradient (of ``grads``) on this rank, given those
        it computed itself."""
        return dict(directions)


class KaisaPlan(LocalPlan):
    """The plan of data-parallel ranks (see the module docstring and :class:`WorkPlan`).

    Gradients and statistics are averaged over the ranks; each block that shares its
    decomposition (``data_parallel == "share"``) is refreshed by its inverse worker, which
    sends :meth:`CurvatureBlock.derived_state` to its gradient workers; with fewer
    gradient workers than ranks, they also send the preconditioned gradients along the
    rows. Other blocks are refreshed by every rank.
    """

    def __init__(self, assignment: WorkPlan, device: torch.device) -> None:
        self.assignment = assignment
        self.groups = Groups(assignment)
        self.device = device  # where received decompositions go

    def agree(self, ok: bool) -> bool:
        return all_agree(ok)

    def average_gradients(self, params: Iterable[Tensor]) -> None:
        average_gradients(params)

    def average_statistics(self, blocks: Iterable[CurvatureBlock]) -> None:
        all_reduce_mean([t for block in blocks for t in block.running_statistics()])

    def refresh(self, blocks: Mapping[str, CurvatureBlock], damping: float) -> None:
        owners = self.assignment.owners
        super().refresh({n: b for n, b in blocks.items() if n not in owners}, damping)
        self._share_from_owners({n: b for n, b in blocks.items() if n in owners}, damping)

    def preconditioned_here(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        me, plan = rank(), self.assignment
        return {
            name: grad
            for name, grad in grads.items()
            if name not in plan.owners or plan.is_grad_worker(name, me)
        }

    def gather_directions(
        self, directions: Mapping[str, Tensor], grads: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        plan = self.assignment
        if plan.grad_workers == plan.world:
            return dict(directions)
        shared = [name for name in grads if name in plan.owners]
        return self._share_with_row(shared, directions, grads)

    def _share_from_owners(self, blocks: Mapping[str, CurvatureBlock], damping: float) -> None:
        """Each owner refreshes its blocks and sends their derived state to its column:
        a small metadata broadcast (keys and shapes), then one tensor broadcast."""
        me, plan = rank(), self.assignment
        group = self.groups.column_of(me)
        for owner in plan.column(me):
            mine = [n for n in blocks if plan.owners[n] == owner]
            if not mine:
                continue
            meta: list[tuple[str, str, list[tuple[torch.Size, torch.dtype]]]] | None = None
            tensors: list[Tensor] = []
            if owner == me:
                meta = []
                for name in mine:
                    blocks[name].refresh(damping)
                    # Installed here too: the receivers' copies are contiguous, and the
                    # same layout keeps the ranks' products bitwise identical.
                    state = {
                        key: tuple(v.contiguous() for v in values)
                        for key, values in blocks[name].derived_state().items()
                    }
                    blocks[name].install_derived(state)
                    for key, values in state.items():
                        meta.append((name, key, [(v.shape, v.dtype) for v in values]))
                        tensors.extend(values)
            if group is None:
                continue
            meta = broadcast_object(meta, owner, group)
            assert meta is not None
            if owner != me:
                tensors = [
                    torch.empty(shape, dtype=dtype, device=self.device)
                    for _, _, specs in meta
                    for shape, dtype in specs
                ]
            broadcast_tensors(tensors, owner, group)
            if owner != me:
                offset = 0
                for name, key, specs in meta:
                    values = tuple(tensors[offset : offset + len(specs)])
                    blocks[name].install_derived({key: values})
                    offset += len(specs)

    def _share_with_row(
        self, names: Sequence[str], directions: Mapping[str, Tensor], grads: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Every layer's preconditioned gradient on every rank of this rank's row; the
        ones this rank did not compute arrive from the row's gradient worker of the layer."""
        me, plan = rank(), self.assignment
        group = self.groups.row_of(me)
        result = dict(directions)
        if group is None:
            return result
        for src in plan.row(me):
            sent = [n for n in names if plan.grad_worker_in_row(n, me) == src]
            if not sent:
                continue
            if src == me:
                tensors = [directions[n] for n in sent]
            else:
                tensors = [torch.empty_like(grads[n]) for n in sent]
            broadcast_tensors(tensors, src, group)
            if src != me:
                result.update(zip(sent, tensors, strict=True))
        return result


def make_plan(
    curvature: str,
    blocks: Mapping[str, CurvatureBlock],
    grad_worker_fraction: float,
    device: torch.device,
) -> LocalPlan:
    """The plan for this process: :class:`LocalPlan` without a process group, else
    :class:`KaisaPlan` over the blocks that share their decomposition, balanced by the
    cost of decomposing them (``Σ d³`` over a block's dimensions)."""
    if not is_distributed():
        return LocalPlan()
    local = sorted({type(b).__name__ for b in blocks.values() if b.data_parallel == "local"})
    if local:
        raise ValueError(
            f"Invalid curvature for torch.distributed: {curvature!r} ({', '.join(local)}) "
            "keeps statistics that cannot be averaged over ranks; use kfac, tkfac, shampoo "
            "or diag"
        )
    costs = {
        name: float(sum(d**3 for d in block.shape))
        for name, block in blocks.items()
        if block.data_parallel == "share"
    }
    return KaisaPlan(WorkPlan.build(costs, world_size(), grad_worker_fraction), device)
