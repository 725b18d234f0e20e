"""Time per training step of ngrl's VI optimizers against Adam and IVON (one MC sample).

    python scripts/bench_bayes.py                       # MLP and CNN, all optimizers
    python scripts/bench_bayes.py --models mlp --steps 30 --repeats 3 --out bench.json
    python scripts/bench_bayes.py --optimizers adam,vogn,floor-vogn,ivon   # some of them

A step is what a user's loop runs per batch: sample the weights, forward, backward (with
the optimizer's statistics), update. Adam's step is ``zero_grad``, forward, backward,
``step``. Each optimizer is warmed up, then timed over ``--steps`` steps, ``--repeats``
times; the table gives the median milliseconds per step and the ratio to Adam's median.
IVON (``pip install ivon-opt``) is measured when installed. Synthetic inputs; one thread.
The "floor" rows are Adam's step plus the products a method cannot avoid.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngrl.bayes import SLANG, VOGN, NoisyAdam, NoisyKFAC, NoisyNaturalGradient
from ngrl.bayes.base import VariationalOptimizer
from ngrl.capture import squared_gradient_sum
from ngrl.layers import LinearLayer, find_layers

DATASET_SIZE = 50_000
Step = Callable[[], None]


def mlp() -> nn.Module:
    """784-256-256-10 (270k parameters), MNIST-sized inputs."""
    return nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def cnn() -> nn.Module:
    """Two 3×3 convolutions (16, 32 channels) with max-pooling, then a dense layer; 28×28."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )  # fmt: skip


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (mlp, (784,)),
    "cnn": (cnn, (1, 28, 28)),
}


def adam_step(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def vi_step(make: Callable[[nn.Module], VariationalOptimizer]) -> Callable[..., Step]:
    def build(model: nn.Module, x: Tensor, y: Tensor) -> Step:
        opt = make(model)

        def step() -> None:
            with opt.sampled_params(train=True):
                F.cross_entropy(model(x), y).backward()
            opt.step()

        return step

    return build


def ivon_step(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    import ivon  # the peer: pip install ivon-opt

    opt = ivon.IVON(model.parameters(), lr=0.1, ess=DATASET_SIZE, mc_samples=1)

    def step() -> None:
        with opt.sampled_params(train=True):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def layer_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """``(d_out, d_in)`` of each dense or conv layer's block ``Ŵ = [W | b]``."""
    return [layer.shape for layer in find_layers(model) if layer.kronecker]  # type: ignore[misc]


def kronecker_floor(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    """Adam's step plus what noisy K-FAC cannot avoid in a step: per layer, the two
    products of a sample (``Q_G Z Q_Aᵀ``) and the two of the preconditioned step
    (``G⁻¹ m A⁻¹``)."""
    adam = adam_step(model, x, y)
    matrices = [
        (torch.randn(o, o), torch.randn(o, i), torch.randn(i, i)) for o, i in layer_shapes(model)
    ]

    def step() -> None:
        adam()
        for left, middle, right in matrices:
            left @ middle @ right  # the sample
            left @ middle @ right  # the step

    return step


def slang_floor(rank: int) -> Callable[..., Step]:
    """Adam's step plus SLANG's two products with the per-example gradients: ``ĜU``
    (``g_nᵀ U_l ā_n``) and ``Ĝᵀc`` (``Gᵀ diag(c) Ā``), ``L·M·d_out·d_in`` each per layer."""

    def build(model: nn.Module, x: Tensor, y: Tensor) -> Step:
        adam = adam_step(model, x, y)
        m = x.shape[0]
        matrices = [
            (torch.randn(m, o), torch.randn(o, i * rank), torch.randn(m, i * rank))
            for o, i in layer_shapes(model)
        ]

        def step() -> None:
            adam()
            for g, factor, scaled in matrices:
                g @ factor
                g.T @ scaled

        return step

    return build


def layer_inputs(model: nn.Module, x: Tensor) -> list[tuple[LinearLayer, Tensor, int]]:
    """Each dense or conv layer, its input on ``x`` and its number of positions ``T`` (a
    convolution's output pixels; 1 for a dense layer on vectors)."""
    found: list[tuple[LinearLayer, Tensor, int]] = []
    hooks = [
        layer.module.register_forward_hook(
            lambda module, inputs, output, layer=layer: found.append(
                (layer, inputs[0], output[0, 0].numel())
            )
        )
        for layer in find_layers(model)
        if isinstance(layer, LinearLayer)
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return found


def vogn_floor(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    """Adam's step plus what VOGN cannot avoid: per layer, the sum of squared per-example
    gradients (``(g²)ᵀ(a²)`` for a dense layer; for a convolution its patches unfolded and
    the per-example gradients formed), the same function VOGN calls, without the bias."""
    adam = adam_step(model, x, y)
    found = [
        (layer, inputs, torch.randn(x.shape[0], t, layer.shape[0]))
        for layer, inputs, t in layer_inputs(model, x)
    ]

    def step() -> None:
        adam()
        for layer, inputs, g in found:
            squared_gradient_sum(layer.patches(inputs), g)

    return step


def floor_macs(model: nn.Module, x: Tensor, rank: int) -> dict[str, int]:
    """Multiply-adds of the floors, and of Adam's forward and backward passes (dense
    layers: ``3·B·d_out·d_in``; convolutions ``T`` times that)."""
    shapes = layer_shapes(model)
    batch = x.shape[0]
    per_position = [(t, *layer.shape) for layer, _, t in layer_inputs(model, x)]
    return {
        "noisy K-FAC products": sum(2 * (o * o * i + o * i * i) for o, i in shapes),
        "SLANG products": sum(2 * rank * batch * o * i for o, i in shapes),
        "VOGN per-example squares": sum(batch * t * o * i for t, o, i in per_position),
        "forward and backward": sum(3 * batch * t * o * i for t, o, i in per_position),
    }


def optimizers(rank: int) -> dict[str, tuple[str, Callable[..., Step]]]:
    """Every optimizer and floor by its ``--optimizers`` key: its label and its step."""
    found: dict[str, tuple[str, Callable[..., Step]]] = {
        "adam": ("Adam", adam_step),
        "vogn": ("VOGN", vi_step(lambda m: VOGN(m, DATASET_SIZE))),
        "noisy-kfac": ("NoisyKFAC", vi_step(lambda m: NoisyKFAC(m, DATASET_SIZE))),
        "noisy-ekfac": (
            "noisy EK-FAC",
            vi_step(lambda m: NoisyNaturalGradient(m, DATASET_SIZE, curvature="ekfac")),
        ),
        "slang": (f"SLANG (L={rank})", vi_step(lambda m: SLANG(m, DATASET_SIZE, rank=rank))),
        "noisy-adam": ("NoisyAdam", vi_step(lambda m: NoisyAdam(m, DATASET_SIZE))),
        "floor-kfac": ("floor: Adam + noisy K-FAC's products", kronecker_floor),
        "floor-slang": (f"floor: Adam + SLANG's products (L={rank})", slang_floor(rank)),
        "floor-vogn": ("floor: Adam + VOGN's per-example squares", vogn_floor),
        "ivon": ("IVON (ivon-opt)", ivon_step),
    }
    return found


def time_steps(step: Step, steps: int, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        runs.append((time.perf_counter() - start) / steps * 1e3)
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument(
        "--batch-sizes",
        default="128,512",
        help="comma-separated examples per step (per-example and eigenbasis costs scale "
        "differently with it)",
    )
    parser.add_argument("--steps", type=int, default=20, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per optimizer")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument(
        "--optimizers",
        default="all",
        help="comma-separated, from: " + ", ".join(optimizers(8)) + " (default: all; Adam "
        "is always measured first, the ratios' denominator)",
    )
    parser.add_argument("--rank", type=int, default=8, help="SLANG's rank L")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(MODELS)}")
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes must be integers, got {args.batch_sizes!r}")
    if any(b < 1 for b in batch_sizes):
        parser.error(f"--batch-sizes must be >= 1, got {args.batch_sizes!r}")
    chosen = optimizers(args.rank)
    if args.optimizers != "all":
        keys = ["adam", *(k for k in args.optimizers.split(",") if k != "adam")]
        unknown = [k for k in keys if k not in chosen]
        if unknown:
            parser.error(f"unknown optimizer(s) {', '.join(unknown)}; valid: {', '.join(chosen)}")
        chosen = {k: chosen[k] for k in keys}
    if "ivon" in chosen and importlib.util.find_spec("ivon") is None:
        print("ivon-opt not installed: IVON not measured (pip install ivon-opt)", file=sys.stderr)
        del chosen["ivon"]
    torch.set_num_threads(args.threads)
    results = []
    for name, batch in itertools.product(models, batch_sizes):
        make_model, shape = MODELS[name]
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, *shape, generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
        params = sum(p.numel() for p in make_model().parameters())
        print(f"\n### {name}: {params:,} parameters, batch {batch}\n")
        macs = floor_macs(make_model(), x, args.rank)
        print(", ".join(f"{k}: {v / 1e6:.0f}M multiply-adds" for k, v in macs.items()) + "\n")
        print("| optimizer | ms per step (median) | ÷ Adam |\n|---|---:|---:|")
        adam = None
        for label, build in chosen.values():
            torch.manual_seed(0)
            runs = time_steps(build(make_model(), x, y), args.steps, args.repeats, args.warmup)
            median = statistics.median(runs)
            adam = median if adam is None else adam
            print(f"| {label} | {median:.2f} | {median / adam:.2f} |", flush=True)
            results.append(
                dict(model=name, optimizer=label, ms_per_step=median, runs=runs,
                     ratio_to_adam=median / adam, parameters=params, batch=batch,
                     floor_multiply_adds=macs)
            )  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
