"""The deep-autoencoder benchmark of the K-FAC and KPSVD papers, for every curvature option.

A deep autoencoder (ReLU hidden layers, sigmoid output, Bernoulli cross-entropy summed
over pixels) is trained on scikit-learn's bundled 8×8 digits (1,797 images, no download)
by SGD with momentum, Adam, and ngrl's K-FAC optimizer with each registered curvature
(kfac, ekfac, tkfac, kpsvd, kfac-corrected, deflation, mfac, shampoo, diag), the setting
of Koroko et al. 2022 (statistics from a quarter of each batch with targets sampled from
the model, momentum 0.9, a KL trust region).

1. **Grid.** Each method's learning rate (and damping, for the curvature options) is
   chosen on a small grid by the final training loss of a shorter run (seed 0).
2. **Curves.** The chosen settings run for ``--epochs`` with ``--seeds`` seeds; the
   training loss (whole training set, after each epoch) is recorded against epochs and
   against the wall-clock time of the updates alone (evaluation excluded).
3. **Targets.** Time for each method to reach Adam's final loss, and for kfac-corrected
   to reach K-FAC's (medians over seeds).
4. **Frobenius errors.** A small autoencoder is trained with K-FAC; at a few points along
   training, each approximation's relative Frobenius error against the exact Fisher
   block of every layer (``ngrl.fisher``, float64, the same sampled targets) is tabled.

    python scripts/curvature_benchmark.py --out results/curvature

Writes results.json, results.md, curves.png (loss vs epochs and vs seconds) and the grid.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from torch import Tensor, nn
from tqdm import tqdm

from ngrl.curvature import available
from ngrl.fisher import layer_indices, per_example_gradients
from ngrl.helpers import write_atomically
from ngrl.optim import KFAC

FIRST_ORDER = ("sgd", "adam")
SECOND_ORDER_LR = 0.3
ARCHITECTURE = (64, 256, 128, 64, 16)
SMALL_ARCHITECTURE = (64, 16, 6)
FROBENIUS_EPOCHS = (0, 10, 50)
POWER_ITERATION_BLOCKS = ("kpsvd", "kfac-corrected", "deflation")
CONVERGED = {"power_iterations": 200, "tolerance": 1e-8}


@dataclass(frozen=True)
class Setup:
    """The shared training set-up of every run."""

    batch_size: int = 256
    fisher_fraction: float = 0.25
    momentum: float = 0.9
    factor_decay: float = 0.95
    factor_update_steps: int = 5
    inv_update_steps: int = 20


GRID: dict[str, dict[str, list[float]]] = {
    "sgd": {"lr": [0.01, 0.03, 0.1, 0.3]},
    "adam": {"lr": [1e-3, 3e-3, 1e-2, 3e-2]},
    # The trust region binds at every learning rate worth trying, so the step size is
    # set by kl_clip: the grid is over it and the damping, at lr = SECOND_ORDER_LR.
    "second-order": {"kl_clip": [1e-5, 1e-4, 1e-3, 1e-2], "damping": [1e-4, 1e-3, 1e-2, 1e-1]},
}


# --- data and model -------------------------------------------------------------------
def digits() -> Tensor:
    """The 1,797 digits as ``(N, 64)`` intensities in [0, 1] (float32)."""
    return torch.from_numpy(load_digits().data / 16.0).float()


def autoencoder(sizes: Sequence[int]) -> nn.Sequential:
    """Encoder ``sizes`` and the mirrored decoder; ReLU inside, logits out (linear code)."""
    widths = [*sizes, *reversed(sizes[:-1])]
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:], strict=False)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i not in (len(sizes) - 2, len(widths) - 2):  # linear code and logit layers
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def reconstruction_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Bernoulli cross-entropy summed over pixels, averaged over examples."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(target)


def sampled_fisher_loss(logits: Tensor, fisher_examples: int) -> Tensor:
    """The same loss on pixels sampled from the model: its gradients give the true Fisher."""
    head = logits[:fisher_examples]
    with torch.no_grad():
        sample = torch.bernoulli(torch.sigmoid(head))
    return reconstruction_loss(head, sample)


# --- training -------------------------------------------------------------------------
def make_optimizer(method: str, model: nn.Module, hyper: dict[str, float], setup: Setup) -> Any:
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=hyper["lr"], momentum=setup.momentum)
    if method == "adam":
        return torch.optim.Adam(model.parameters(), lr=hyper["lr"])
    return KFAC(
        model,
        lr=SECOND_ORDER_LR,
        damping=hyper["damping"],
        kl_clip=hyper["kl_clip"],
        momentum=setup.momentum,
        factor_decay=setup.factor_decay,
        factor_update_steps=setup.factor_update_steps,
        inv_update_steps=setup.inv_update_steps,
        curvature=method,
    )


def train(
    method: str, hyper: dict[str, float], data: Tensor, epochs: int, seed: int, setup: Setup
) -> dict[str, list[float]]:
    """Losses after each epoch (index 0: before training) and the update seconds so far."""
    torch.manual_seed(seed)
    model = autoencoder(ARCHITECTURE)
    optimizer = make_optimizer(method, model, hyper, setup)
    fisher_examples = max(1, int(setup.batch_size * setup.fisher_fraction))
    generator = torch.Generator().manual_seed(seed)

    def full_loss() -> float:
        with torch.no_grad():
            return float(reconstruction_loss(model(data), data))

    losses, seconds, elapsed = [full_loss()], [0.0], 0.0
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        start = time.perf_counter()
        try:
            for batch in order.split(setup.batch_size):
                x = data[batch]
                logits = model(x)
                if isinstance(optimizer, KFAC) and optimizer.capture_due:
                    optimizer.capture_backward(sampled_fisher_loss(logits, fisher_examples))
                optimizer.zero_grad()
                reconstruction_loss(logits, x).backward()
                optimizer.step()
        except RuntimeError:  # a diverged run (an eigendecomposition of overflowed factors)
            losses.append(float("inf"))
            seconds.append(elapsed + time.perf_counter() - start)
            break
        elapsed += time.perf_counter() - start
        losses.append(full_loss())
        seconds.append(elapsed)
        if not np.isfinite(losses[-1]):
            break
    return {"loss": losses, "seconds": seconds}


def grid_points(method: str) -> list[dict[str, float]]:
    grid = GRID.get(method, GRID["second-order"])
    points: list[dict[str, float]] = [{}]
    for key, values in grid.items():
        points = [{**point, key: value} for point in points for value in values]
    return points


def grid_score(run: dict[str, list[float]], epochs: int) -> float:
    """The worst of the last five epoch losses (a setting that spikes or diverges late
    loses to a steady one), ``inf`` for a run that stopped early."""
    if len(run["loss"]) != epochs + 1:
        return float("inf")
    return max(run["loss"][-5:])


def time_to_reach(run: dict[str, list[float]], target: float) -> float | None:
    """Update seconds until the epoch-end loss is at or below ``target`` (None: never)."""
    for loss, seconds in zip(run["loss"], run["seconds"], strict=True):
        if loss <= target:
            return seconds
    return None


# --- Frobenius errors -----------------------------------------------------------------
def frobenius_table(
    data: Tensor,
    curvatures: Sequence[str],
    setup: Setup,
    progress: bool,
    points: Sequence[int] = FROBENIUS_EPOCHS,
) -> dict[str, dict[str, float]]:
    """``{"epoch E": {curvature: mean relative error over layers}}`` for a small AE."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        data = data.double()
        model = autoencoder(SMALL_ARCHITECTURE)
        trainer = KFAC(
            model, lr=SECOND_ORDER_LR, damping=1e-2, kl_clip=1e-2, momentum=setup.momentum
        )
        layers = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        table: dict[str, dict[str, float]] = {}
        for epoch in tqdm(range(max(points) + 1), desc="frobenius", disable=not progress):
            if epoch in points:
                table[f"epoch {epoch}"] = _errors_at(model, data[:256], layers, curvatures)
            if epoch == max(points):
                break
            for batch in torch.randperm(len(data)).split(setup.batch_size):
                logits = model(data[batch])
                trainer.capture_backward(sampled_fisher_loss(logits, len(batch)))
                trainer.zero_grad()
                reconstruction_loss(logits, data[batch]).backward()
                trainer.step()
        trainer.remove_hooks()
        return table
    finally:
        torch.set_default_dtype(previous)


def _errors_at(
    model: nn.Module, x: Tensor, layers: list[str], curvatures: Sequence[str]
) -> dict[str, float]:
    with torch.no_grad():
        targets = torch.bernoulli(
            torch.sigmoid(model(x)), generator=torch.Generator().manual_seed(1)
        )

    def per_example_loss(output: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(output, target, reduction="sum")

    grads = per_example_gradients(model, per_example_loss, x, targets)
    exact = {}
    for layer in layers:
        rows = grads[:, layer_indices(model, layer)]
        exact[layer] = rows.T @ rows / len(x)
    errors = {}
    for name in curvatures:
        # Training defaults, except that power iterations run to convergence: a fresh
        # probe has no running factors to warm-start from, as a training block has.
        options = CONVERGED if name in POWER_ITERATION_BLOCKS else {}
        probe = KFAC(model, curvature=name, curvature_options=options, factor_decay=0.0)
        with probe.capture():
            reconstruction_loss(model(x), targets).backward()
        probe.zero_grad()
        probe.remove_hooks()
        relative = [
            float((probe.blocks[layer].to_dense() - exact[layer]).norm() / exact[layer].norm())
            for layer in layers
        ]
        errors[name] = statistics.fmean(relative)
    return errors


# --- reporting ------------------------------------------------------------------------
def median_curve(runs: list[dict[str, list[float]]], key: str) -> list[float]:
    length = min(len(run[key]) for run in runs)
    return [statistics.median(run[key][i] for run in runs) for i in range(length)]


def plot_curves(results: dict[str, Any], path: Path) -> None:
    fig = Figure(figsize=(12, 4.5))
    by_epoch, by_time = fig.subplots(1, 2)
    for method, result in results.items():
        loss = median_curve(result["runs"], "loss")
        seconds = median_curve(result["runs"], "seconds")
        style = "--" if method in FIRST_ORDER else "-"
        by_epoch.plot(range(len(loss)), loss, style, label=method)
        by_time.plot(seconds, loss, style, label=method)
    for ax, label in ((by_epoch, "epoch"), (by_time, "update seconds (median over seeds)")):
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("training loss (BCE summed over pixels)")
        ax.grid(alpha=0.3)
    start = statistics.median(r["runs"][0]["loss"][0] for r in results.values())
    for ax in (by_epoch, by_time):
        ax.set_ylim(top=1.5 * start)  # a diverged run leaves the plot instead of flattening it
    by_time.legend(fontsize=8, ncol=2)
    fig.suptitle("Deep autoencoder on digits " + "-".join(map(str, ARCHITECTURE)))
    write_atomically(
        path, lambda target: fig.savefig(target, format="png", dpi=110, bbox_inches="tight")
    )


def _format_time(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def markdown(report: dict[str, Any]) -> str:
    results = report["results"]
    adam_final = report["targets"]["adam_final_loss"]
    kfac_final = report["targets"]["kfac_final_loss"]
    lines = [
        f"Machine: {report['machine']}. Epochs {report['epochs']}, seeds {report['seeds']}, "
        f"grid epochs {report['grid_epochs']}.",
        "",
        "| method | chosen | final loss (median) | s/epoch | "
        f"s to Adam's final loss ({adam_final:.3f}) | s to K-FAC's final loss ({kfac_final:.3f}) |",
        "|---|---|---|---|---|---|",
    ]
    for method, result in results.items():
        hyper = result["hyperparameters"]
        chosen = ", ".join(f"{key} {value:g}" for key, value in hyper.items())
        lines.append(
            f"| {method} | {chosen} | {result['final_loss']:.4f} | "
            f"{result['seconds_per_epoch']:.3f} | {_format_time(result['time_to_adam'])} | "
            f"{_format_time(result['time_to_kfac'])} |"
        )
    lines += [
        "",
        "Grid (worst of the last five epoch losses of a grid run, seed 0; lr for SGD and Adam, "
        f"kl_clip/damping at lr {SECOND_ORDER_LR} for the rest):",
        "",
        "| method | setting → loss |",
        "|---|---|",
    ]
    for method, trials in report["grid"].items():
        cells = ", ".join(
            "/".join(f"{v:g}" for v in trial["hyperparameters"].values())
            + f" → {trial['loss']:.3g}"
            for trial in trials
        )
        lines.append(f"| {method} | {cells} |")
    table = report["frobenius"]
    names = list(next(iter(table.values())))
    lines += [
        "",
        "Relative Frobenius error against the exact Fisher block (mean over layers):",
        "",
        "| point | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for point, errors in table.items():
        lines.append(f"| {point} | " + " | ".join(f"{errors[n]:.4f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


# --- command line ---------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--methods",
        default=",".join([*FIRST_ORDER, *available()]),
        help="comma-separated methods (default: sgd, adam and every curvature)",
    )
    parser.add_argument(
        "--epochs", type=int, default=100, help="epochs of the curves (default: 100)"
    )
    parser.add_argument(
        "--grid-epochs",
        type=int,
        default=40,
        help="epochs of each grid run (default: 40); a setting scores the "
        "worst of its last five epoch losses",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: 3)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/curvature"),
        help="folder for results.json, results.md, curves.png",
    )
    parser.add_argument(
        "--frobenius-epochs",
        default=",".join(map(str, FROBENIUS_EPOCHS)),
        help="training epochs of the small autoencoder at which the "
        "Frobenius errors are measured (default: 0,10,50)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default: 1, so timings do not share cores)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    valid = [*FIRST_ORDER, *available()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in valid]
    if unknown:
        print(
            f"curvature_benchmark: unknown method(s) {', '.join(unknown)}; "
            f"valid: {', '.join(valid)}",
            file=sys.stderr,
        )
        return 2
    for name in ("epochs", "grid_epochs", "seeds", "threads"):
        if getattr(args, name) < 1:
            print(f"curvature_benchmark: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        points = sorted({int(p) for p in args.frobenius_epochs.split(",") if p.strip()})
    except ValueError:
        points = []
    if not points or points[0] < 0:
        print(
            "curvature_benchmark: --frobenius-epochs must be comma-separated epochs >= 0",
            file=sys.stderr,
        )
        return 2
    if "adam" not in methods:
        methods.insert(0, "adam")  # the target everyone is measured against
    torch.set_num_threads(args.threads)
    try:  # before any training, so that a bad --out costs nothing
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"curvature_benchmark: --out {args.out}: {error.strerror}", file=sys.stderr)
        return 2
    setup, data, progress = Setup(), digits(), not args.no_progress

    warnings.simplefilter("ignore", RuntimeWarning)  # skipped non-finite steps of bad grid points
    grid: dict[str, list[dict[str, Any]]] = {}
    chosen: dict[str, dict[str, float]] = {}
    total = sum(len(grid_points(m)) for m in methods)
    with tqdm(total=total, desc="grid", disable=not progress) as bar:
        for method in methods:
            trials = []
            for point in grid_points(method):
                run = train(method, point, data, args.grid_epochs, 0, setup)
                loss = grid_score(run, args.grid_epochs)
                trials.append({"hyperparameters": point, "loss": loss})
                bar.update()
            grid[method] = trials
            chosen[method] = min(trials, key=lambda t: t["loss"])["hyperparameters"]

    results: dict[str, Any] = {}
    with tqdm(total=len(methods) * args.seeds, desc="curves", disable=not progress) as bar:
        for method in methods:
            runs = []
            for seed in range(args.seeds):
                runs.append(train(method, chosen[method], data, args.epochs, seed, setup))
                bar.update()
            results[method] = {"hyperparameters": chosen[method], "runs": runs}
    adam_final = statistics.median(run["loss"][-1] for run in results["adam"]["runs"])
    kfac_final = (
        statistics.median(run["loss"][-1] for run in results["kfac"]["runs"])
        if "kfac" in results
        else float("nan")
    )
    for result in results.values():
        runs = result["runs"]
        result["final_loss"] = statistics.median(run["loss"][-1] for run in runs)
        result["seconds_per_epoch"] = statistics.median(
            run["seconds"][-1] / (len(run["seconds"]) - 1) for run in runs
        )
        for key, target in (("time_to_adam", adam_final), ("time_to_kfac", kfac_final)):
            times = [time_to_reach(run, target) for run in runs]
            reached = [t for t in times if t is not None]
            result[key] = statistics.median(reached) if len(reached) * 2 > len(runs) else None

    curvatures = [m for m in methods if m not in FIRST_ORDER]
    frobenius = frobenius_table(data, curvatures, setup, progress, points) if curvatures else {}
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"torch thread(s), torch {torch.__version__}",
        "epochs": args.epochs,
        "grid_epochs": args.grid_epochs,
        "seeds": args.seeds,
        "setup": setup.__dict__,
        "grid": grid,
        "results": results,
        "targets": {"adam_final_loss": adam_final, "kfac_final_loss": kfac_final},
        "frobenius": frobenius,
    }
    write_atomically(
        args.out / "results.json", lambda target: target.write_text(json.dumps(report, indent=1))
    )
    write_atomically(args.out / "results.md", lambda target: target.write_text(markdown(report)))
    plot_curves(results, args.out / "curves.png")
    print(markdown(report))
    print(f"written: {args.out}/results.json, results.md, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
