"""Learning curves as PNG files."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ngrl.helpers import write_atomically

__all__ = ["read_episodes", "rolling_mean", "plot_learning_curve"]


def read_episodes(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(timesteps, returns)`` of an episode log written by :class:`ngrl.agents.callbacks.EpisodeLog`."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    steps = np.array([float(r["timesteps"]) for r in rows])
    returns = np.array([float(r["return"]) for r in rows])
    return steps, returns


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    cumulative = np.cumsum(np.insert(values.astype(float), 0, 0.0))
    index = np.arange(1, len(values) + 1)
    start = np.maximum(index - window, 0)
    return (cumulative[index] - cumulative[start]) / (index - start)


def plot_learning_curve(
    episode_logs: Sequence[Path],
    png: Path,
    title: str,
    labels: Sequence[str] | None = None,
    window: int = 100,
) -> None:
    """Episode returns against timesteps (faint) with their rolling mean, one line per log.

    The PNG is written atomically: a reader (or a crash) sees the old plot or the new one.
    """
    figure = Figure(figsize=(7, 4.2))
    axes = figure.subplots()
    for index, log in enumerate(episode_logs):
        steps, returns = read_episodes(log)
        if len(steps) == 0:
            continue
        color = f"C{index}"
        label = labels[index] if labels else None
        axes.plot(steps, returns, color=color, alpha=0.15, linewidth=0.8)
        axes.plot(steps, rolling_mean(returns, window), color=color, label=label, linewidth=2)
    axes.set_xlabel("timesteps")
    axes.set_ylabel(f"episode return (mean of last {window})")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if labels:
        axes.legend()
    figure.tight_layout()
    write_atomically(png, lambda target: figure.savefig(target, dpi=110, format="png"))
