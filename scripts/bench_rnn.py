"""K-FAC for recurrent networks against Adam on the addition problem.

The addition problem (Hochreiter & Schmidhuber 1997; the benchmark of Martens & Sutskever
2011 and of Martens, Ba & Johnson 2018's K-FAC for RNNs): each sequence has ``T`` steps of
two inputs, a value drawn uniformly from [0, 1] and a marker that is 1 at two random steps
(one in each half) and 0 elsewhere; the target is the sum of the two marked values. A
predictor that ignores the markers has a mean squared error of about 1/6 (the variance of
the sum); solving the task needs memory across the whole sequence. The data are generated
here, never downloaded.

An LSTM (one layer) reads the sequence and a dense layer maps its last state to the sum.
Methods: Adam (learning rates from a grid, the best by final loss), and ngrl's K-FAC with
the time steps as independent positions (``recurrent="independent"``) and with the chain
of correlated steps (``recurrent="chain"``), statistics from the Gaussian Fisher of the
output (targets sampled from the model). Each method trains for ``--steps`` updates on
fresh batches; the loss on a fixed evaluation set is recorded against updates and
against the wall-clock time of the updates (evaluation excluded); medians over seeds.

    python scripts/bench_rnn.py --out results/rnn

Writes results.json, results.md and curves.png (loss vs updates and vs seconds).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn
from tqdm import tqdm

from ngrl import fisher_loss
from ngrl.helpers import write_atomically
from ngrl.optim import KFAC

ADAM_GRID = (1e-3, 3e-3, 1e-2)
KFAC_SETTINGS = {"lr": 0.1, "damping": 1e-2, "kl_clip": 1e-2, "momentum": 0.9}
METHODS = ("adam", "kfac", "kfac-chain")


def addition_batch(n: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(x, y)``: ``x`` of shape ``(n, length, 2)`` (value, marker), ``y`` of ``(n, 1)``."""
    values = torch.rand(n, length, generator=generator)
    half = length // 2
    first = torch.randint(0, half, (n,), generator=generator)
    second = torch.randint(half, length, (n,), generator=generator)
    markers = torch.zeros(n, length)
    rows = torch.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    y = (values * markers).sum(1, keepdim=True)
    return torch.stack([values, markers], dim=2), y


class Adder(nn.Module):
    """An LSTM over the sequence, a dense layer on its last hidden state."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def train(
    method: str, lr: float | None, args: argparse.Namespace, seed: int
) -> dict[str, list[float]]:
    """One run: evaluation loss after every ``--eval-every`` updates, with the updates'
    cumulative seconds."""
    torch.manual_seed(seed)
    model = Adder(args.hidden)
    data = torch.Generator().manual_seed(10_000 + seed)
    eval_x, eval_y = addition_batch(1024, args.length, torch.Generator().manual_seed(1))
    step: Callable[[Tensor, Tensor], None]
    if method == "adam":
        adam = torch.optim.Adam(model.parameters(), lr=lr)

        def step(x: Tensor, y: Tensor) -> None:
            adam.zero_grad()
            F.mse_loss(model(x), y).backward()
            adam.step()

    else:
        recurrent = "chain" if method == "kfac-chain" else "independent"
        kfac = KFAC(model, recurrent=recurrent, **KFAC_SETTINGS)  # type: ignore[arg-type]

        def step(x: Tensor, y: Tensor) -> None:
            prediction = model(x)
            if kfac.capture_due:
                with kfac.capture():
                    fisher_loss(prediction, kind="gaussian").backward(retain_graph=True)
            kfac.zero_grad()
            F.mse_loss(prediction, y).backward()
            kfac.step()

    losses, seconds, elapsed = [], [], 0.0
    for update in range(args.steps + 1):
        if update % args.eval_every == 0:
            with torch.no_grad():
                losses.append(float(F.mse_loss(model(eval_x), eval_y)))
            seconds.append(elapsed)
        if update == args.steps:
            break
        x, y = addition_batch(args.batch_size, args.length, data)
        start = time.perf_counter()
        step(x, y)
        elapsed += time.perf_counter() - start
    return {"loss": losses, "seconds": seconds}


def median_curve(runs: list[dict[str, list[float]]], key: str) -> list[float]:
    return [statistics.median(values) for values in zip(*(r[key] for r in runs), strict=True)]


def first_below(curve: list[float], axis: list[float], threshold: float) -> float | None:
    return next((x for x, loss in zip(axis, curve, strict=True) if loss <= threshold), None)


def write_report(report: dict[str, Any], out: Path) -> None:
    methods = report["methods"]
    lines = [
        "| method | setting | final loss (median) | updates to 0.01 | seconds to 0.01 | "
        "seconds per update |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, entry in methods.items():
        updates = [u * report["eval_every"] for u in range(len(entry["loss"]))]
        to_updates = first_below(entry["loss"], updates, 0.01)
        to_seconds = first_below(entry["loss"], entry["seconds"], 0.01)
        lines.append(
            f"| {name} | {entry['setting']} | {entry['loss'][-1]:.4f} | "
            f"{'—' if to_updates is None else f'{to_updates:,}'} | "
            f"{'—' if to_seconds is None else f'{to_seconds:.1f}'} | "
            f"{1000 * entry['seconds'][-1] / report['steps']:.1f} ms |"
        )
    text = (
        f"Addition problem, T = {report['length']}, LSTM({report['hidden']}), batch "
        f"{report['batch_size']}, {report['steps']} updates, {report['seeds']} seeds "
        f"(medians). Machine: {report['machine']}.\n\n" + "\n".join(lines) + "\n"
    )
    write_atomically(out / "results.md", lambda target: target.write_text(text))
    figure = Figure(figsize=(10, 4))
    by_update, by_time = figure.subplots(1, 2)
    for name, entry in methods.items():
        updates = [u * report["eval_every"] for u in range(len(entry["loss"]))]
        by_update.plot(updates, entry["loss"], label=name)
        by_time.plot(entry["seconds"], entry["loss"], label=name)
    for axis, label in ((by_update, "updates"), (by_time, "seconds (updates only)")):
        axis.set_yscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("evaluation MSE (median over seeds)")
        axis.axhline(1 / 6, color="grey", linestyle=":", linewidth=1)
        axis.legend()
    figure.tight_layout()
    write_atomically(
        out / "curves.png", lambda target: figure.savefig(target, format="png", dpi=120)
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument("--steps", type=int, default=1500, help="updates per run")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method")
    parser.add_argument("--length", type=int, default=30, help="sequence length T")
    parser.add_argument("--hidden", type=int, default=32, help="LSTM hidden size")
    parser.add_argument("--batch-size", type=int, default=128, help="sequences per update")
    parser.add_argument("--eval-every", type=int, default=50, help="updates between evaluations")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods: {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    for name in ("steps", "seeds", "length", "hidden", "batch_size", "eval_every"):
        if getattr(args, name) < 1 or (name == "length" and args.length < 2):
            raise SystemExit(f"--{name.replace('_', '-')} must be positive (length >= 2)")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    settings: list[tuple[str, float | None]] = [
        (m, lr) for m in methods for lr in (ADAM_GRID if m == "adam" else (None,))
    ]
    runs: dict[tuple[str, float | None], list[dict[str, list[float]]]] = {}
    with tqdm(total=len(settings) * args.seeds, disable=args.no_progress) as bar:
        for method, lr in settings:
            for seed in range(args.seeds):
                runs.setdefault((method, lr), []).append(train(method, lr, args, seed))
                bar.update()
    chosen: dict[str, Any] = {}
    for method in methods:
        candidates = [(lr, r) for (m, lr), r in runs.items() if m == method]
        lr, best = min(candidates, key=lambda c: median_curve(c[1], "loss")[-1])
        setting = (
            f"lr {lr:g} (best of {', '.join(f'{g:g}' for g in ADAM_GRID)})"
            if lr
            else (", ".join(f"{k} {v:g}" for k, v in KFAC_SETTINGS.items()))
        )
        chosen[method] = {
            "setting": setting,
            "loss": median_curve(best, "loss"),
            "seconds": median_curve(best, "seconds"),
            "runs": best,
        }
    report = {
        **{k: getattr(args, k) for k in ("steps", "seeds", "length", "hidden", "batch_size")},
        "eval_every": args.eval_every,
        "machine": f"{platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread",
        "methods": chosen,
    }
    write_atomically(
        args.out / "results.json", lambda target: target.write_text(json.dumps(report, indent=1))
    )
    write_report(report, args.out)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
