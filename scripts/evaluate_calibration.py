"""Can the model's confidence be trusted? ngrl's VI optimizers side by side with the peers.

    python scripts/evaluate_calibration.py --dataset digits \\
        --methods adam,vogn,noisy-kfac,slang,noisy-adam,ivon,laplace,ensemble \\
        --seeds 3 --out results/calibration

Every method trains the same MLP on the same split, batches and epochs (``ngrl.bayes.evaluation.methods``)
for each seed; the test-set metrics of ``ngrl.bayes.calibration`` are reported as mean and
standard deviation over the seeds. The run folder gets:

* ``results.json``: the command, settings and options, and per method every metric
  (mean, std and the per-seed values), the training time and, when ``adam`` is among
  the methods, the paired differences from it (:func:`paired_difference`);
* ``results.md``: the same as Markdown tables;
* ``reliability.png``: the reliability diagrams of all methods side by side (15 bins,
  test predictions of all seeds pooled); for regression, observed against nominal
  interval coverage;
* ``entropy.png``: histograms of the predictive entropy in and out of distribution (for
  regression, of the predictive standard deviation).

``ivon`` and ``laplace`` need the peers extra (``make peers``). Bad input (an unknown
dataset, method or setting) ends the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from ngrl.bayes import calibration
from ngrl.bayes.datasets import DATASETS, SPLITS, Dataset, load
from ngrl.bayes.evaluation.methods import (
    METHOD_OPTIONS,
    METHODS,
    SETTINGS,
    TUNED_OPTIONS,
    Run,
    Settings,
    options_for,
    settings_for,
)
from ngrl.helpers import add_override_option, parse_override, write_atomically

EXIT_USAGE = 2
DEFAULT_METHODS = "adam,vogn,noisy-kfac,slang,noisy-adam,ensemble"
TABLE_METRICS = {
    "classification": [
        "accuracy",
        "nll",
        "brier",
        "ece_15",
        "ece_20",
        "adaptive_ece_15",
        "mce_15",
        "auroc_misclassification",
        "aurc",
    ],
    "regression": ["nll", "rmse", "coverage_50", "coverage_90", "coverage_95"],
}
HIGHER_IS_BETTER = {"accuracy", "auroc_misclassification"}
# Compared with the reference method seed by seed (same split, batches and initialisation).
PAIRED_METRICS = {"classification": ["nll", "ece_15"], "regression": ["nll"]}
REFERENCE = "adam"


class UsageError(Exception):
    """Input the user can fix: reported in one line, exit status 2."""


def _epilog() -> str:
    default = Settings()
    lines = ["settings (--set KEY=VALUE), defaults:"]
    lines.append("  " + ", ".join(f"{f}={v!r}" for f, v in vars(default).items()))
    for dataset, settings in SETTINGS.items():
        changed = {f: v for f, v in vars(settings).items() if getattr(default, f) != v}
        lines.append(f"  on {dataset}: " + ", ".join(f"{f}={v!r}" for f, v in changed.items()))
    lines.append("method options (--set METHOD.KEY=VALUE), defaults:")
    lines += [f"  {m}: {o}" for m, o in METHOD_OPTIONS.items() if o]
    lines.append("chosen on the validation split (replace the defaults):")
    for dataset, chosen in TUNED_OPTIONS.items():
        lines.append(f"  on {dataset}: " + "; ".join(f"{m} {o}" for m, o in chosen.items()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(),
    )
    parser.add_argument(
        "--dataset", default="digits", help=f"one of: {', '.join(DATASETS)} (default: digits)"
    )
    parser.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated, from: {', '.join(METHODS)} (default: {DEFAULT_METHODS})",
    )
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="test",
        help="evaluate on the test split, or on a validation split held out of the training "
        "split (for choosing options without the test set; default: test)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: 3)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: results/calibration/DATASET); files in it are replaced",
    )
    add_override_option(
        parser,
        "a setting (epochs=20, hidden=[32]) or a method option (vogn.lr=0.01); repeatable",
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default: cpu)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def parse_request(args: argparse.Namespace) -> tuple[list[str], Settings, dict[str, dict]]:
    if args.dataset not in DATASETS:
        raise UsageError(f"unknown dataset {args.dataset!r}; valid: {', '.join(DATASETS)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(f"unknown method(s) {unknown or methods}; valid: {', '.join(METHODS)}")
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    for method in methods:
        try:
            METHODS[method].check_available()
        except ImportError as error:
            raise UsageError(str(error)) from None
    settings: dict[str, Any] = {}
    overrides: dict[str, dict[str, Any]] = {}
    for text in args.overrides:
        try:
            key, value = parse_override(text)
        except ValueError as error:
            raise UsageError(str(error)) from None
        method, dot, name = key.rpartition(".")
        if not dot:
            settings[name] = value
        elif method not in METHOD_OPTIONS:
            raise UsageError(
                f"unknown method {method!r} in --set {text}; valid: {', '.join(METHODS)}"
            )
        else:
            overrides.setdefault(method, {})[name] = value
    try:
        resolved = settings_for(args.dataset, settings)
        options = options_for(args.dataset, overrides)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise UsageError(f"--device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch sees no CUDA device")
    return methods, resolved, options


def _to_numpy(prediction: Any) -> Any:
    if isinstance(prediction, tuple):
        return tuple(p.detach().cpu().numpy() for p in prediction)
    return prediction.detach().cpu().numpy()


class Diverged(Exception):
    """A trained method whose predictions are not finite."""


def _finite(prediction: Any) -> bool:
    parts = prediction if isinstance(prediction, tuple) else (prediction,)
    return all(np.all(np.isfinite(p)) for p in parts)


def evaluate(dataset: Dataset, predictive: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """The test metrics of one trained method, and the raw predictions for the plots."""
    test = _to_numpy(predictive(dataset.x_test))
    ood = {name: _to_numpy(predictive(x)) for name, x in dataset.ood.items()}
    if not all(_finite(p) for p in (test, *ood.values())):
        raise Diverged("non-finite predictions")
    labels = dataset.y_test.numpy()
    if dataset.task == "classification":
        metrics = calibration.classification_metrics(test, labels)
        for name, probs in ood.items():
            metrics[f"auroc_ood_{name}"] = calibration.auroc_ood(test, probs)
        spread = {"test": calibration.predictive_entropy(test)}
        spread |= {name: calibration.predictive_entropy(p) for name, p in ood.items()}
    else:
        mean, variance = test
        metrics = calibration.regression_metrics(mean, variance, labels)
        spread = {"test": np.sqrt(variance)} | {n: np.sqrt(v) for n, (_, v) in ood.items()}
        for name in ood:
            is_out = np.r_[np.zeros(len(spread["test"])), np.ones(len(spread[name]))]
            scores = np.r_[spread["test"], spread[name]]
            metrics[f"auroc_ood_{name}"] = calibration.auroc(scores, is_out)
            metrics[f"std_ratio_{name}"] = float(spread[name].mean() / spread["test"].mean())
    return metrics, {"test": test, "labels": labels, "spread": spread}


def summarise(values: list[float]) -> dict[str, Any]:
    finite = [v for v in values if np.isfinite(v)]
    return {
        "mean": statistics.fmean(finite) if finite else float("nan"),
        "std": statistics.pstdev(finite) if len(finite) > 1 else 0.0,
        "values": values,
    }


def paired_difference(values: dict[int, float], reference: dict[int, float]) -> dict[str, Any]:
    """``method − reference`` per seed (the seeds both have, finite): the mean difference
    with its 95% Student-t interval, and whether that interval excludes 0."""
    seeds = sorted(
        s for s in values.keys() & reference.keys() if np.isfinite(values[s] - reference[s])
    )
    diffs = [values[s] - reference[s] for s in seeds]
    mean = statistics.fmean(diffs) if diffs else float("nan")
    if len(diffs) < 2:
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "seeds": seeds,
                "significant": False}  # fmt: skip
    if statistics.stdev(diffs) == 0.0:  # scipy's interval is undefined (NaN) there
        low = high = mean
    else:
        interval = scipy.stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
        low, high = float(interval.low), float(interval.high)
    return {"mean": mean, "low": low, "high": high, "seeds": seeds,
            "significant": bool(low > 0.0 or high < 0.0)}  # fmt: skip


def paired_table(task: str, results: dict[str, Any]) -> str:
    """The paired differences from the reference method as a Markdown table."""
    columns = PAIRED_METRICS[task]
    lines = [
        f"Paired against {REFERENCE} (method − {REFERENCE} per seed: mean [95% interval]; "
        "n.s. where the interval contains 0):",
        "",
        "| method | " + " | ".join(f"Δ {c}" for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for method, result in results.items():
        paired = result.get("paired")
        if method == REFERENCE or not paired:
            continue
        cells = []
        for column in columns:
            d = paired[column]
            verdict = "" if d["significant"] else " n.s."
            cells.append(f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]{verdict}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(task: str, results: dict[str, Any]) -> str:
    trained = [r for r in results.values() if "metrics" in r]
    if not trained:
        return "every method diverged on every seed\n"
    first = trained[0]["metrics"]
    columns = TABLE_METRICS[task] + sorted(k for k in first if k.startswith(("auroc_ood", "std_")))
    lines = [
        "| method | " + " | ".join(columns) + " | train s |",
        "|---|" + "---:|" * (len(columns) + 1),
    ]
    for method, result in results.items():
        if "metrics" not in result:
            lines.append(f"| {method} | " + " | ".join(["diverged"] * (len(columns) + 1)) + " |")
            continue
        cells = []
        for column in columns:
            stat = result["metrics"][column]
            cells.append(f"{stat['mean']:.4f} ± {stat['std']:.4f}")
        seconds = result["train_seconds"]["mean"]
        note = (
            f" ({len(result['diverged_seeds'])} seed(s) diverged)"
            if result["diverged_seeds"]
            else ""
        )
        lines.append(f"| {method}{note} | " + " | ".join(cells) + f" | {seconds:.1f} |")
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda target: target.write_text(text))


def _save_figure(fig: Any, path: Path) -> None:
    write_atomically(
        path, lambda target: fig.savefig(target, format="png", dpi=120, bbox_inches="tight")
    )


def _panels(n: int, height: float) -> tuple[Any, list[Any]]:
    """A grid of ``n`` panels, four to a row; the unused ones are hidden."""
    cols = min(4, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(3.0 * cols, height * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat


def plot_reliability(task: str, raw: dict[str, list[dict]], path: Path) -> None:
    fig, axes = _panels(len(raw), height=3.2)
    for ax, (method, runs) in zip(axes, raw.items(), strict=False):
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        if task == "classification":
            probs = np.concatenate([r["test"] for r in runs])
            labels = np.concatenate([r["labels"] for r in runs])
            diagram = calibration.reliability(probs, labels, bins=15)
            centres = (diagram.edges[:-1] + diagram.edges[1:]) / 2
            filled = diagram.count > 0
            width = 1.0 / len(centres)
            ax.bar(
                centres[filled],
                diagram.accuracy[filled],
                width=width,
                edgecolor="black",
                color="tab:blue",
                label="accuracy",
            )
            ax.bar(
                centres[filled],
                (diagram.confidence - diagram.accuracy)[filled],
                bottom=diagram.accuracy[filled],
                width=width,
                color="tab:red",
                alpha=0.35,
                label="gap",
            )
            ece = calibration.ece(probs, labels, 15)
            ax.set_title(f"{method}\nECE {ece:.3f} (seeds pooled)", fontsize=9)
            ax.set_xlabel("confidence")
        else:
            levels = np.linspace(0.05, 0.95, 19)
            observed = [
                np.mean([calibration.coverage(*r["test"], r["labels"], lv) for r in runs])
                for lv in levels
            ]
            ax.plot(levels, observed, marker="o", markersize=3)
            ax.set_title(method)
            ax.set_xlabel("nominal coverage")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy" if task == "classification" else "observed coverage")
    if task == "classification":
        axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_spread(task: str, raw: dict[str, list[dict]], path: Path) -> None:
    fig, axes = _panels(len(raw), height=2.8)
    for ax, (method, runs) in zip(axes, raw.items(), strict=False):
        sets = runs[0]["spread"].keys()
        pooled = {s: np.concatenate([r["spread"][s] for r in runs]) for s in sets}
        top = max(float(v.max()) for v in pooled.values()) or 1.0
        bins = np.linspace(0.0, top, 30)
        for name, values in pooled.items():
            label = "test (in)" if name == "test" else f"{name} (out)"
            ax.hist(values, bins=bins, alpha=0.5, density=True, label=label)
        ax.set_title(method)
        ax.set_xlabel("predictive entropy (nats)" if task == "classification" else "predictive std")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        methods, settings, options = parse_request(args)
    except UsageError as error:
        print(f"evaluate_calibration.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    out = args.out or Path("results/calibration") / args.dataset
    try:  # before any training, so that a bad --out costs nothing
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"evaluate_calibration.py: error: --out {out}: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE
    device = torch.device(args.device)

    results: dict[str, Any] = {}
    raw: dict[str, list[dict]] = {m: [] for m in methods}
    per_seed: dict[str, dict[int, dict[str, float]]] = {m: {} for m in methods}
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    diverged: dict[str, list[int]] = {m: [] for m in methods}
    tasks = [(seed, method) for seed in range(args.seeds) for method in methods]
    dataset: Dataset | None = None
    run: Run | None = None
    progress = tqdm(tasks, disable=args.no_progress, unit="run")
    for seed, method in progress:
        progress.set_description(f"{args.dataset} seed {seed} {method}")
        if run is None or run.seed != seed:
            dataset = load(args.dataset, seed, args.split)
            run = Run(dataset, settings, seed, options, device)
        assert dataset is not None
        start = time.perf_counter()
        predictive = METHODS[method].train(run)
        seconds[method].append(time.perf_counter() - start)
        try:
            metrics, predictions = evaluate(dataset, predictive)
        except Diverged:
            tqdm.write(f"warning: {method} diverged on seed {seed} (non-finite predictions)")
            diverged[method].append(seed)
            continue
        per_seed[method][seed] = metrics
        raw[method].append(predictions)
    assert dataset is not None

    for method in methods:
        if not per_seed[method]:
            results[method] = {"diverged_seeds": diverged[method]}
            continue
        runs = per_seed[method].values()
        keys = next(iter(runs)).keys()
        results[method] = {
            "metrics": {k: summarise([m[k] for m in runs]) for k in keys},
            "train_seconds": summarise(seconds[method]),
            "diverged_seeds": diverged[method],
        }
        if REFERENCE in methods and method != REFERENCE:
            results[method]["paired"] = {
                k: paired_difference(
                    {s: m[k] for s, m in per_seed[method].items()},
                    {s: m[k] for s, m in per_seed[REFERENCE].items()},
                )
                for k in PAIRED_METRICS[dataset.task]
            }
    report = {
        "command": "python scripts/evaluate_calibration.py " + shlex.join(sys.argv[1:]),
        "dataset": args.dataset,
        "task": dataset.task,
        "split": args.split,
        "seeds": args.seeds,
        "settings": vars(settings),
        "options": {m: options[m] for m in methods},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "device": str(device),
        "methods": results,
    }
    _write_text(out / "results.json", json.dumps(report, indent=2) + "\n")
    table = markdown_table(dataset.task, results)
    if REFERENCE in methods and len(methods) > 1:
        table += "\n" + paired_table(dataset.task, results)
    header = f"# Calibration on {args.dataset}, {args.seeds} seed(s)\n\n`{report['command']}`\n\n"
    _write_text(out / "results.md", header + table)
    plotted = {m: runs for m, runs in raw.items() if runs}
    if plotted:
        plot_reliability(dataset.task, plotted, out / "reliability.png")
        plot_spread(dataset.task, plotted, out / "entropy.png")
    print(table)
    print(f"wrote {out}/results.json, results.md, reliability.png, entropy.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
