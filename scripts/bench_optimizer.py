"""Wall time per update: ACKTR-style K-FAC against A2C-style SGD and Adam, same run.

Models:
  nature-cnn   the Nature-CNN actor-critic (SB3's NatureCNN, 6 actions) on a batch of
               32 envs × 20 steps = 640 Atari frames (84×84×4, uint8)
  autoencoder  the MNIST deep autoencoder 784-1000-500-250-30-250-500-1000-784
               (Hinton & Salakhutdinov 2006; Martens & Grosse 2015), batch 512

An update is what an agent does per batch: SGD/Adam = forward, one backward, clip, step;
K-FAC = forward, a Fisher backward on sampled targets inside `capture()` every
`factor_update_steps` updates, the loss backward, step (eigendecompositions every
`inv_update_steps`). Each configuration is timed over whole cycles of --cycle updates
(so amortised work is counted); the figure is the median over --repeats cycles.

    python scripts/bench_optimizer.py --model all --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from stable_baselines3.common.torch_layers import NatureCNN
from torch import Tensor, nn
from torch.distributions import Bernoulli, Categorical
from tqdm import tqdm

from ngrl import KFAC, fisher_loss
from ngrl.curvature import KFACBlock
from ngrl.layers import Layer


# --- workloads -------------------------------------------------------------------------
class ActorCritic(nn.Module):
    """SB3's Nature CNN with a policy and a value head (A2C/ACKTR on Atari)."""

    def __init__(self, actions: int = 6) -> None:
        super().__init__()
        space = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
        self.features = NatureCNN(space, features_dim=512)
        self.policy = nn.Linear(512, actions)
        self.value = nn.Linear(512, 1)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(obs.float() / 255.0)
        return self.policy(h), self.value(h)[:, 0]


@dataclass
class Workload:
    """A model, one batch, the training loss and the sampled-target (Fisher) loss."""

    name: str
    model: nn.Module
    loss: Callable[[object], Tensor]
    fisher: Callable[[object], Tensor]
    batch: dict[str, Tensor] = field(default_factory=dict)

    def forward(self, model: nn.Module) -> object:
        return model(self.batch["x"])


def nature_cnn(batch: int) -> Workload:
    gen = torch.Generator().manual_seed(0)
    data = dict(
        x=torch.randint(0, 256, (batch, 4, 84, 84), dtype=torch.uint8, generator=gen),
        actions=torch.randint(0, 6, (batch,), generator=gen),
        advantages=torch.randn(batch, generator=gen),
        returns=torch.randn(batch, generator=gen),
    )

    def loss(out: object) -> Tensor:
        logits, values = out  # type: ignore[misc]
        dist = Categorical(logits=logits)
        policy = -(data["advantages"] * dist.log_prob(data["actions"])).mean()
        return policy + 0.5 * F.mse_loss(values, data["returns"]) - 0.01 * dist.entropy().mean()

    def fisher(out: object) -> Tensor:
        logits, values = out  # type: ignore[misc]
        return fisher_loss(Categorical(logits=logits)) + fisher_loss(
            values[:, None], kind="gaussian"
        )

    return Workload("nature-cnn", ActorCritic(), loss, fisher, data)


def autoencoder(batch: int) -> Workload:
    sizes = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(sizes) - 2 and d_out != 30:
            layers.append(nn.ReLU())
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 784, generator=gen) > 0.7).float()
    data = dict(x=x)

    def loss(out: object) -> Tensor:
        return F.binary_cross_entropy_with_logits(out, data["x"], reduction="none").sum(1).mean()  # type: ignore[arg-type]

    def fisher(out: object) -> Tensor:
        return fisher_loss(Bernoulli(logits=out))  # type: ignore[arg-type]

    return Workload("autoencoder", nn.Sequential(*layers), loss, fisher, data)


# --- the updates -----------------------------------------------------------------------
def first_order_update(
    work: Workload, model: nn.Module, opt: torch.optim.Optimizer
) -> Callable[[], None]:
    def update() -> None:
        loss = work.loss(work.forward(model))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()

    return update


def kfac_update(
    work: Workload, model: nn.Module, opt: KFAC, stats_only: bool
) -> Callable[[], None]:
    def update() -> None:
        out = work.forward(model)
        if opt.capture_due:
            if stats_only:
                opt.capture_backward(work.fisher(out))
            else:
                with opt.capture():
                    work.fisher(out).backward(retain_graph=True)
        opt.zero_grad()
        work.loss(out).backward()
        opt.step()

    return update


@dataclass
class Config:
    label: str
    factor_update_steps: int = 1
    stats_only: bool = False
    weight_sharing: str = "expand"
    damping_rule: str = "exact"
    stats_batch_size: int | None = None
    inv_update_steps: int = 10


def kfac_ladder(batch: int) -> list[Config]:
    """The default K-FAC, then each speed option added on top of the previous ones."""
    sub = batch // 5
    configs = []
    for f in (1, 10):
        configs += [
            Config(f"K-FAC f={f}", f),
            Config(f"K-FAC f={f} +stats-only bwd", f, True),
            Config(f"K-FAC f={f} +stats-only +reduce", f, True, "reduce"),
            Config(f"K-FAC f={f} +… +factored", f, True, "reduce", "factored"),
            Config(f"K-FAC f={f} +… +stats {sub}/{batch}", f, True, "reduce", "factored", sub),
        ]
    configs.append(
        Config("K-FAC f=10 +… +inv_update_steps=20", 10, True, "reduce", "factored", sub, 20)
    )
    return configs


def time_cycles(update: Callable[[], None], cycle: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean time per update over a cycle of updates."""
    for _ in range(cycle):  # warm-up: factors, first eigendecompositions, allocator
        update()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(cycle):
            update()
        samples.append((time.perf_counter() - start) / cycle)
    return statistics.median(samples)


def median_time(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# --- where the extra time goes ---------------------------------------------------------
def breakdown(work: Workload, repeats: int) -> list[tuple[str, float]]:
    """Seconds for each piece of a K-FAC update, per call."""
    model = copy.deepcopy(work.model)
    rows: list[tuple[str, float]] = []
    rows.append(("forward", median_time(lambda: work.forward(model), repeats)))

    def forward_backward(which: Callable[[object], Tensor]) -> None:
        which(work.forward(model)).backward()

    rows.append(
        ("forward + loss backward", median_time(lambda: forward_backward(work.loss), repeats))
    )
    rows.append(
        (
            "forward + Fisher backward (full)",
            median_time(lambda: forward_backward(work.fisher), repeats),
        )
    )
    opt = KFAC(model)
    batch = work.batch["x"].shape[0]
    cheap = KFAC(model, weight_sharing="reduce", stats_batch_size=batch // 5)
    for label, kfac in (("expand, all examples", opt), (f"reduce, {batch // 5} examples", cheap)):

        def stats_only_backward(kfac: KFAC = kfac) -> None:
            kfac.capture_backward(work.fisher(work.forward(model)), retain_graph=False)
            for block in kfac.blocks.values():
                block.discard()

        rows.append(
            (
                f"forward + stats-only Fisher backward + statistics ({label})",
                median_time(stats_only_backward, repeats),
            )
        )
    cheap.remove_hooks()

    # Layer inputs and output gradients, to time each statistic on its own.
    stash: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []
    for layer in opt.layers:

        def hook(module: nn.Module, inputs: tuple, output: Tensor, layer: Layer = layer) -> None:
            output.register_hook(lambda g: stash.__setitem__(layer.name, (inputs[0].detach(), g)))

        handles.append(layer.module.register_forward_hook(hook))
    with opt.capture():
        forward_backward(work.fisher)
    for handle in handles:
        handle.remove()
    n = work.batch["x"].shape[0]
    for layer in opt.layers:
        x, g = stash[layer.name]
        block = opt.blocks[layer.name]
        for sharing in ("expand", "reduce"):
            if sharing == "reduce" and not isinstance(layer.module, nn.Conv2d):
                continue

            def stats(layer: Layer = layer, block=block, sharing=sharing, x=x, g=g) -> None:
                a, gg = layer.statistics(x, g * n, sharing)  # type: ignore[arg-type]
                block.accumulate(a, gg)
                block.discard()

            rows.append(
                (
                    f"statistics {layer.name} {tuple(layer.shape)} {sharing}",
                    median_time(stats, repeats),
                )
            )
    for layer in opt.layers:
        if not isinstance(opt.blocks[layer.name], KFACBlock):
            continue
        grad = torch.randn(layer.shape)
        for rule in ("exact", "factored"):
            block = KFACBlock(layer.shape, damping_rule=rule)  # same factors, other rule
            block.load_state_dict(opt.blocks[layer.name].state_dict())
            label = "eigendecomposition" if rule == "exact" else "Cholesky inverses"
            big = max(layer.shape) > 1024  # one eigendecomposition of a big factor is enough
            rows.append(
                (
                    f"{label} {layer.name} {tuple(layer.shape)}",
                    median_time(partial(block.refresh, 1e-2), 1 if big else repeats),
                )
            )
            rows.append(
                (
                    f"precondition ({rule}) {layer.name}",
                    median_time(partial(block.precondition, grad, 1e-2), repeats),
                )
            )
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, no GPU"


def run(work: Workload, args: argparse.Namespace) -> dict:
    batch = work.batch["x"].shape[0]
    results: dict[str, float] = {}
    configs: list[tuple[str, int, Callable[[nn.Module], Callable[[], None]]]] = [
        (
            "SGD (A2C-style)",
            args.cycle,
            lambda m: first_order_update(
                work, m, torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
            ),
        ),
        (
            "Adam",
            args.cycle,
            lambda m: first_order_update(work, m, torch.optim.Adam(m.parameters(), lr=1e-4)),
        ),
    ]
    for config in kfac_ladder(batch):

        def build(m: nn.Module, c: Config = config) -> Callable[[], None]:
            opt = KFAC(
                m,
                lr=0.1,
                factor_update_steps=c.factor_update_steps,
                inv_update_steps=c.inv_update_steps,
                weight_sharing=c.weight_sharing,  # type: ignore[arg-type]
                stats_batch_size=c.stats_batch_size,
                curvature_options={"damping_rule": c.damping_rule},
            )
            return kfac_update(work, m, opt, c.stats_only)

        cycle = math.lcm(args.cycle, config.factor_update_steps, config.inv_update_steps)
        configs.append((config.label, cycle, build))
    for label, cycle, build in tqdm(configs, desc=work.name):
        model = copy.deepcopy(work.model)
        results[label] = time_cycles(build(model), cycle, args.repeats)
    return dict(updates=results, breakdown=breakdown(work, args.repeats) if args.breakdown else [])


def report(name: str, result: dict) -> str:
    sgd = result["updates"]["SGD (A2C-style)"]
    lines = [f"### {name}", "", "| update | ms / update (median) | ÷ SGD |", "|---|---:|---:|"]
    for label, seconds in result["updates"].items():
        lines.append(f"| {label} | {seconds * 1e3:.0f} | {seconds / sgd:.2f} |")
    if result["breakdown"]:
        lines += ["", "| piece (per call) | ms |", "|---|---:|"]
        lines += [f"| {label} | {seconds * 1e3:.1f} |" for label, seconds in result["breakdown"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--model",
        choices=["nature-cnn", "autoencoder", "all"],
        default="all",
        help="which workload to time",
    )
    parser.add_argument(
        "--cnn-batch", type=int, default=640, help="frames per Atari update (32 envs × 20 steps)"
    )
    parser.add_argument("--ae-batch", type=int, default=512, help="examples per autoencoder update")
    parser.add_argument(
        "--cycle",
        type=int,
        default=10,
        help="updates per timed cycle (raised to a multiple of each configuration's step counts)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed cycles per configuration (median taken)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--no-breakdown",
        dest="breakdown",
        action="store_false",
        help="skip the per-piece breakdown",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    workloads = []
    if args.model in ("nature-cnn", "all"):
        workloads.append(nature_cnn(args.cnn_batch))
    if args.model in ("autoencoder", "all"):
        workloads.append(autoencoder(args.ae_batch))
    print(f"machine: {machine()}\n")
    results = {}
    for work in workloads:
        results[work.name] = run(work, args)
        print(report(work.name, results[work.name]) + "\n", flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(machine=machine(), results=results), indent=1))


if __name__ == "__main__":
    main()
