"""K-FAC against SGD and Adam on a small classification problem (`make demo`).

Trains the same MLP on a generated three-arm spiral with each optimizer, from the same
initial weights and the same mini-batches, and reports training loss and test accuracy
per epoch. Writes ``curves.csv`` and ``learning_curves.png`` into ``--out``.

    python scripts/demo_kfac_vs_sgd.py --epochs 30 --out runs/demo
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ngrl import KFAC, fisher_loss


def spirals(
    n: int, classes: int, noise: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``n`` points on ``classes`` interleaved spiral arms in the plane."""
    labels = torch.randint(0, classes, (n,), generator=generator)
    radius = torch.rand(n, generator=generator)
    angle = 4.0 * radius + 2.0 * math.pi * labels / classes
    angle = angle + noise * torch.randn(n, generator=generator)
    points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    return points, labels


def make_model(width: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(2, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, classes),
    )


def make_optimizer(name: str, model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    if name == "kfac":
        return KFAC(
            model,
            lr=args.kfac_lr,
            damping=args.damping,
            kl_clip=args.kl_clip,
            momentum=0.9,
            factor_decay=0.95,
            inv_update_steps=10,
        )
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.sgd_lr, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=args.adam_lr)


def train(
    name: str, model: nn.Module, data: dict[str, Tensor], args: argparse.Namespace
) -> list[dict]:
    opt = make_optimizer(name, model, args)
    generator = torch.Generator().manual_seed(args.seed)
    x, y = data["x_train"], data["y_train"]
    rows = []
    start = time.perf_counter()
    for epoch in tqdm(range(1, args.epochs + 1), desc=f"{name:>4}", leave=False):
        order = torch.randperm(x.shape[0], generator=generator)
        total = 0.0
        for batch in order.split(args.batch_size):
            out = model(x[batch])
            if isinstance(opt, KFAC) and opt.capture_due:
                with opt.capture():
                    fisher_loss(out, kind="categorical").backward(retain_graph=True)
            opt.zero_grad()
            loss = F.cross_entropy(out, y[batch])
            loss.backward()
            opt.step()
            total += loss.item() * batch.numel()
        with torch.no_grad():
            accuracy = (model(data["x_test"]).argmax(1) == data["y_test"]).double().mean()
        rows.append(
            dict(
                optimizer=name,
                epoch=epoch,
                train_loss=total / x.shape[0],
                test_accuracy=float(accuracy),
                seconds=time.perf_counter() - start,
            )
        )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        mine = [r for r in rows if r["optimizer"] == name]
        epochs = [r["epoch"] for r in mine]
        left.plot(epochs, [r["train_loss"] for r in mine], label=name)
        right.plot(epochs, [r["test_accuracy"] for r in mine], label=name)
    left.set(xlabel="epoch", ylabel="training loss", yscale="log", title="Training loss")
    right.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=128, help="examples per update")
    parser.add_argument("--train-size", type=int, default=3000, help="training points")
    parser.add_argument("--width", type=int, default=64, help="hidden units per layer")
    parser.add_argument("--kfac-lr", type=float, default=0.05, help="K-FAC learning rate")
    parser.add_argument("--damping", type=float, default=0.1, help="K-FAC damping")
    parser.add_argument("--kl-clip", type=float, default=1e-3, help="K-FAC trust region")
    parser.add_argument(
        "--sgd-lr", type=float, default=0.1, help="SGD (momentum 0.9) learning rate"
    )
    parser.add_argument("--adam-lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, weights and batches")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    x_train, y_train = spirals(args.train_size, 3, 0.2, generator)
    x_test, y_test = spirals(2000, 3, 0.2, generator)
    data = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    initial = make_model(args.width, 3)

    rows: list[dict] = []
    for name in ("kfac", "sgd", "adam"):
        rows += train(name, copy.deepcopy(initial), data, args)

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "curves.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "learning_curves.png")

    print(f"{'optimizer':>9} {'train loss':>11} {'test acc':>9} {'seconds':>8}")
    for name in ("kfac", "sgd", "adam"):
        last = [r for r in rows if r["optimizer"] == name][-1]
        print(
            f"{name:>9} {last['train_loss']:>11.4f} {last['test_accuracy']:>9.3f} "
            f"{last['seconds']:>8.1f}"
        )
    print(f"curves: {args.out / 'curves.csv'}, plot: {args.out / 'learning_curves.png'}")


if __name__ == "__main__":
    main()
