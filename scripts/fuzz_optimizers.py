"""Fuzz every curvature and VI optimizer with hostile inputs and settings; print a table.

Each trial builds a small MLP or CNN, an optimizer (a K-FAC curvature or a variational
optimizer) with ordinary or extreme damping (1e-12, 1e12: K-FAC's damping, the VI prior
precision), and takes a few steps on inputs that are rank-1, zero, scaled by 1e±12 or
hold a NaN or an infinity, with batch size 1, 2 or 7, in float32, float64 or bfloat16.

Construction may refuse a combination with a ``ValueError`` (a clear error); after that,
an exception escaping ``step()`` is a **crash**, and a non-finite parameter or a step
reported as skipped that changed the parameters is a **corruption**.

    python scripts/fuzz_optimizers.py --trials 300
    python scripts/fuzz_optimizers.py --trials 50 --optimizers kfac slang
"""

from __future__ import annotations

import argparse
import random
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngrl import fisher_loss
from ngrl.bayes import SLANG, VOGN, NoisyAdam, NoisyKFAC
from ngrl.bayes.base import VariationalOptimizer
from ngrl.curvature import available
from ngrl.optim import KFAC

VARIATIONAL: dict[str, Callable[..., VariationalOptimizer]] = {
    "vogn": VOGN,
    "noisy-adam": NoisyAdam,
    "slang": lambda model, n, **kw: SLANG(model, n, rank=2, **kw),
    "noisy-kfac": lambda model, n, **kw: NoisyKFAC(
        model, n, factor_update_steps=1, inv_update_steps=2, **kw
    ),
}
OPTIMIZERS = [*available(), *VARIATIONAL]
INPUTS = ("normal", "rank-1", "zero", "huge", "tiny", "nan", "inf")
CLASSES = 3


@dataclass(frozen=True)
class Trial:
    optimizer: str
    network: str  # "mlp" or "cnn"
    inputs: str  # one of INPUTS
    batch: int
    dtype: torch.dtype
    extreme: float | None  # the damping (K-FAC) or prior precision (VI), or None

    @classmethod
    def draw(cls, optimizer: str, rng: random.Random) -> Trial:
        return cls(
            optimizer,
            rng.choice(("mlp", "cnn")),
            rng.choice(INPUTS),
            rng.choice((1, 2, 7)),
            rng.choice((torch.float32, torch.float64, torch.bfloat16)),
            rng.choice((None, 1e-12, 1e12)),
        )


def network(kind: str, dtype: torch.dtype) -> nn.Module:
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, CLASSES))
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, CLASSES)
        )
    return model.to(dtype)


def inputs(trial: Trial, generator: torch.Generator) -> Tensor:
    shape = (trial.batch, 5) if trial.network == "mlp" else (trial.batch, 1, 5, 5)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    if trial.inputs == "rank-1":
        x = x[:1].expand(shape).clone()
    elif trial.inputs == "zero":
        x.zero_()
    elif trial.inputs == "huge":
        x *= 1e12
    elif trial.inputs == "tiny":
        x *= 1e-12
    elif trial.inputs in ("nan", "inf"):
        x.view(-1)[0] = float(trial.inputs)
    return x.to(trial.dtype)


def build(trial: Trial, model: nn.Module) -> KFAC | VariationalOptimizer:
    if trial.optimizer in VARIATIONAL:
        options = {} if trial.extreme is None else {"prior_precision": trial.extreme}
        return VARIATIONAL[trial.optimizer](model, 50, lr=0.1, **options)
    options = {} if trial.extreme is None else {"damping": trial.extreme}
    return KFAC(model, lr=0.1, curvature=trial.optimizer, inv_update_steps=2, **options)


def kfac_step(opt: KFAC, model: nn.Module, x: Tensor, y: Tensor) -> None:
    out = model(x).float()
    if opt.capture_due:
        with opt.capture():
            fisher_loss(out, "categorical").backward(retain_graph=True)
    opt.zero_grad()
    F.cross_entropy(out, y).backward()
    opt.step()


def variational_step(opt: VariationalOptimizer, model: nn.Module, x: Tensor, y: Tensor) -> None:
    with opt.sampled_params(train=True):
        F.cross_entropy(model(x).float(), y).backward()
    opt.step()


def run(trial: Trial, seed: int, steps: int = 3) -> str:
    """Run one trial; returns how it ended: ``"refused"``, ``"stepped"``, ``"skipped"``
    (some step was skipped), ``"crash: <exception>"`` or ``"corrupt: <what>"``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = network(trial.network, trial.dtype)
    try:
        opt = build(trial, model)
    except ValueError:
        return "refused"  # a clear error at construction is an allowed answer
    take = variational_step if isinstance(opt, VariationalOptimizer) else kfac_step
    skipped = 0
    for _ in range(steps):
        x = inputs(trial, generator)
        y = torch.randint(0, CLASSES, (trial.batch,), generator=generator)
        before = [p.detach().clone() for p in model.parameters()]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                take(opt, model, x, y)  # type: ignore[arg-type]
            except Exception as error:  # noqa: BLE001 - what the fuzz is looking for
                return f"crash: {type(error).__name__}"
        after = list(model.parameters())
        if not all(bool(torch.isfinite(p).all()) for p in after):
            return "corrupt: non-finite parameter"
        if any("this step was skipped" in str(w.message) for w in caught):
            skipped += 1
            if not all(torch.equal(p, q) for p, q in zip(after, before, strict=True)):
                return "corrupt: a skipped step changed the parameters"
    return "skipped" if skipped else "stepped"


def fuzz(optimizer: str, trials: int, seed: int) -> Counter[str]:
    """The outcomes of ``trials`` trials of one optimizer (reproducible from ``seed``)."""
    rng = random.Random(f"{optimizer}-{seed}")
    return Counter(run(Trial.draw(optimizer, rng), seed=index) for index in range(trials))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100, help="trials per optimizer")
    parser.add_argument("--seed", type=int, default=0, help="draws the trials")
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=OPTIMIZERS,
        choices=OPTIMIZERS,
        metavar="NAME",
        help=f"which to fuzz (default all: {', '.join(OPTIMIZERS)})",
    )
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error(f"--trials must be >= 1, got {args.trials}")
    print(
        "| optimizer | trials | stepped | skipped a step | refused (clear error) | crashes | corruptions |"
    )
    print("|---|---|---|---|---|---|---|")
    failures = 0
    for name in args.optimizers:
        outcomes = fuzz(name, args.trials, args.seed)
        crashes = {k: v for k, v in outcomes.items() if k.startswith("crash")}
        corrupt = {k: v for k, v in outcomes.items() if k.startswith("corrupt")}
        failures += sum(crashes.values()) + sum(corrupt.values())
        print(
            f"| {name} | {args.trials} | {outcomes['stepped']} | {outcomes['skipped']} | "
            f"{outcomes['refused']} | {_counts(crashes)} | {_counts(corrupt)} |"
        )
    return 1 if failures else 0


def _counts(found: dict[str, int]) -> str:
    if not found:
        return "0"
    return ", ".join(f"{count} ({what.split(': ', 1)[1]})" for what, count in found.items())


if __name__ == "__main__":
    sys.exit(main())
