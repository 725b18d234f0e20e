"""Callbacks of the training CLI: a progress bar with the score, an episode log,
checkpoints, and a clean stop on SIGTERM or SIGINT."""

from __future__ import annotations

import csv
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from tqdm.auto import tqdm

__all__ = [
    "EpisodeLog",
    "PeriodicCheckpoint",
    "ScoreProgressBar",
    "StopOnSignal",
    "Stopped",
    "recent_score",
]

EPISODE_COLUMNS = ("timesteps", "return", "length", "seconds")


def recent_score(model: object) -> float | None:
    """Mean return of the model's recent episodes (SB3's 100-episode window)."""
    buffer = getattr(model, "ep_info_buffer", None)
    return float(np.mean([info["r"] for info in buffer])) if buffer else None


class ScoreProgressBar(BaseCallback):
    """A tqdm bar over the run's timesteps, showing the recent mean episode score."""

    def __init__(self, total_timesteps: int) -> None:
        super().__init__()
        self.total_timesteps = total_timesteps
        self.bar: tqdm | None = None

    def _on_training_start(self) -> None:
        self.bar = tqdm(
            total=self.total_timesteps,
            initial=self.model.num_timesteps,
            unit="step",
            dynamic_ncols=True,
            smoothing=0.05,
        )

    def _on_rollout_end(self) -> None:
        assert self.bar is not None
        self.bar.update(self.model.num_timesteps - self.bar.n)
        score = recent_score(self.model)
        if score is not None:
            self.bar.set_postfix(score=f"{score:.1f}", refresh=False)

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        if self.bar is not None:
            self.bar.update(self.model.num_timesteps - self.bar.n)
            self.bar.close()


class EpisodeLog(BaseCallback):
    """Appends every finished episode to a CSV file: timesteps, return, length, seconds.
    ``start_seconds`` is the clock at the start: a resumed run's goes on from the earlier
    run's records, so the last row holds the run's whole training time."""

    def __init__(self, path: Path, start_seconds: float = 0.0) -> None:
        super().__init__()
        self.path = path
        self.start_seconds = start_seconds
        self.start = time.monotonic()

    def _on_training_start(self) -> None:
        if not self.path.exists():
            with open(self.path, "w", newline="") as handle:
                csv.writer(handle).writerow(EPISODE_COLUMNS)
        self.start = time.monotonic()

    def _on_step(self) -> bool:
        rows = [
            (
                self.num_timesteps,
                info["episode"]["r"],
                info["episode"]["l"],
                round(self.start_seconds + time.monotonic() - self.start, 3),
            )
            for info in self.locals.get("infos", ())
            if "episode" in info
        ]
        if rows:
            with open(self.path, "a", newline="") as handle:
                csv.writer(handle).writerows(rows)
        return True


class PeriodicCheckpoint(BaseCallback):
    """Calls ``save()`` after every ``every`` updates (at the start of the next rollout)."""

    def __init__(self, every: int, save: Callable[[], None]) -> None:
        super().__init__()
        self.every = every
        self.save = save
        self.rollouts = 0

    def _on_rollout_start(self) -> None:
        if self.rollouts and self.every and self.rollouts % self.every == 0:
            self.save()
        self.rollouts += 1

    def _on_step(self) -> bool:
        return True


class FinalLog(BaseCallback):
    """Writes the logs once more when training ends: SB3 logs every ``log_interval``
    rollouts, before the update, so the last update's figures (and, in a run shorter than
    the interval, all of them) would otherwise never reach progress.csv or TensorBoard."""

    def __init__(self) -> None:
        super().__init__()
        self.iterations = 0

    def _on_rollout_end(self) -> None:
        self.iterations += 1

    def _on_training_end(self) -> None:
        if self.iterations:
            self.model.dump_logs(self.iterations)  # type: ignore[attr-defined]

    def _on_step(self) -> bool:
        return True


class Stopped(Exception):
    """Training stopped between two updates because of a signal (:class:`StopOnSignal`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopOnSignal(BaseCallback):
    """Stop training between two updates after SIGTERM (SLURM, Kubernetes, torchrun,
    ``timeout``) or SIGINT (Ctrl-C).

    The handlers only record the signal; the next rollout start raises :class:`Stopped`,
    so the model then holds exactly the steps it was trained on (its step and update
    counts, schedules and statistics agree) and a checkpoint of it resumes cleanly. A
    second signal stops at once with ``KeyboardInterrupt``. ``agree`` turns this rank's
    "a signal arrived" into the ranks' common answer (under ``torch.distributed``: any
    rank), so that all ranks stop at the same update.

    Use :meth:`install` before ``learn`` and :meth:`restore` after it (in ``finally``).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, agree: Callable[[bool], bool] = bool) -> None:
        super().__init__()
        self.agree = agree
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def _on_rollout_start(self) -> None:
        if self.agree(self.received is not None):
            raise Stopped(self.received or signal.SIGTERM)

    def _on_step(self) -> bool:
        return True
