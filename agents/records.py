"""A resumed run's records continue the earlier run's, without the stretch it lost.

A run killed after its last checkpoint has logged episodes and progress past the step the
checkpoint holds; the resumed run trains that stretch again. So the new run folder starts
from the earlier records up to the checkpoint's step only, and the curve of a run killed
and resumed any number of times has the shape of one continuous run.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from stable_baselines3.common.logger import Logger

from ngrl.helpers import write_atomically

__all__ = ["continue_episodes", "continue_progress", "run_clock"]

#: The column of SB3's progress.csv that holds the step of each row.
STEP_COLUMN = "time/total_timesteps"


def run_clock(seconds: np.ndarray) -> np.ndarray:
    """Seconds since a run's start from the ``seconds`` column of an episodes.csv. Records
    written before a resumed run's clock went on from the earlier run's restart at zero
    after each resume; each restart adds the time before it."""
    restarted = np.diff(seconds, prepend=seconds[:1]) < 0
    before = np.concatenate([[0.0], seconds[:-1]])
    return seconds + np.cumsum(np.where(restarted, before, 0.0))


def continue_episodes(previous: Path, target: Path, up_to_step: int) -> float:
    """Copy the episodes of ``previous`` (an episodes.csv) that ended by ``up_to_step``;
    return the run's wall-clock seconds at the last one (:func:`run_clock`; 0 without any),
    from which the resumed run's clock goes on. The time between that episode and the
    checkpoint is not counted."""
    if not previous.is_file():
        return 0.0
    with open(previous, newline="") as handle:
        rows = list(csv.reader(handle))
    kept = rows[:1] + [row for row in rows[1:] if row and int(float(row[0])) <= up_to_step]

    def write(path: Path) -> None:
        with open(path, "w", newline="") as handle:
            csv.writer(handle).writerows(kept)

    write_atomically(target, write)
    if len(kept) == 1:
        return 0.0
    return float(run_clock(np.array([float(row[3]) for row in kept[1:]]))[-1])


def continue_progress(previous: Path, logger: Logger, up_to_step: int) -> None:
    """Write the rows of ``previous`` (a progress.csv) logged by ``up_to_step`` again
    through ``logger``, so its CSV and TensorBoard outputs start with them."""
    if not previous.is_file():
        return
    with open(previous, newline="") as handle:
        for row in csv.DictReader(handle):
            step = row.get(STEP_COLUMN) or ""
            if not step or int(float(step)) > up_to_step:
                continue
            for key, value in row.items():
                if value:
                    logger.record(key, _number(value))
            logger.dump(int(float(step)))


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text
