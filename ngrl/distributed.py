"""Data-parallel K-FAC over ``torch.distributed``: averaged statistics, shared inverses.

Every rank holds the whole model and its own slice of the data. When a process group is
initialised (``torchrun``; gloo on CPUs, NCCL on GPUs), :class:`ngrl.optim.KFAC` calls
into this module so that the ranks stay identical:

* **gradients** are averaged before each step, all of them in one flat all-reduce;
* **curvature statistics** are averaged after each commit, in one flat all-reduce. The
  running statistics of the blocks that support it (:attr:`CurvatureBlock.rank_averaged`)
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

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

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
    "is_distributed",
    "rank",
    "share_from_owners",
    "share_with_row",
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


def share_from_owners(
    names: Sequence[str],
    plan: WorkPlan,
    groups: Groups,
    produce: Callable[[str], list[Tensor] | None],
    consume: Callable[[str, list[Tensor]], None],
    device: torch.device,
) -> None:
    """Send each layer's decomposition from its inverse worker to the rest of its column.

    ``produce(name)`` runs on the inverse worker (it computes the decomposition and
    returns its tensors, or ``None`` if there is none yet); ``consume(name, tensors)``
    installs them on every rank of the column, the owner included. Each owner sends all
    its layers at once: a small metadata broadcast (shapes), then one tensor broadcast.
    """
    me = rank()
    group = groups.column_of(me)
    for owner in plan.column(me):
        mine = [n for n in names if plan.owners[n] == owner]
        if not mine:
            continue
        payload: dict[str, list[Tensor]] = {}
        meta: list[tuple[str, list[tuple[torch.Size, torch.dtype]]]] | None = None
        if owner == me:
            produced = {n: produce(n) for n in mine}
            # Contiguous copies, installed here too: the receivers' copies are contiguous,
            # and the same layout keeps the ranks' products bitwise identical.
            payload = {n: [t.contiguous() for t in ts] for n, ts in produced.items() if ts}
            for name, tensors in payload.items():
                consume(name, tensors)
            meta = [(n, [(t.shape, t.dtype) for t in ts]) for n, ts in payload.items()]
        if group is None:
            continue
        meta = broadcast_object(meta, owner, group)
        assert meta is not None
        if owner == me:
            tensors = [t for n, _ in meta for t in payload[n]]
        else:
            tensors = [
                torch.empty(shape, dtype=dtype, device=device)
                for _, specs in meta
                for shape, dtype in specs
            ]
        broadcast_tensors(tensors, owner, group)
        if owner != me:
            offset = 0
            for name, specs in meta:
                consume(name, tensors[offset : offset + len(specs)])
                offset += len(specs)


def share_with_row(
    names: Sequence[str],
    plan: WorkPlan,
    groups: Groups,
    directions: Mapping[str, Tensor],
    shapes: Mapping[str, Sequence[int]],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    """Every layer's preconditioned gradient on every rank of this rank's row.

    ``directions`` holds the layers this rank preconditioned; the others arrive from the
    row's gradient worker of each layer, one broadcast per sending rank.
    """
    me = rank()
    group = groups.row_of(me)
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
            tensors = [torch.empty(tuple(shapes[n]), dtype=dtype, device=device) for n in sent]
        broadcast_tensors(tensors, src, group)
        if src != me:
            result.update(zip(sent, tensors, strict=True))
    return result
