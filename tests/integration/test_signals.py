"""`python -m ngrl.train` stopped by SIGTERM or SIGINT: a checkpoint of exactly the trained
steps, the resume command, exit 128 + signal; the checkpoint resumes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ngrl.agents import ACKTR

#: ``python -m ngrl.train acktr`` on CartPole, quietly: the start of every command here.
TRAIN = [
    sys.executable,
    "-m",
    "ngrl.train",
    "acktr",
    "--env",
    "CartPole",
    "--no-progress",
    "--eval-episodes",
    "0",
]


def _resume(checkpoint: Path, run_dir: Path, timesteps: int, *extra: str) -> None:
    done = subprocess.run(
        [
            *TRAIN,
            "--resume",
            str(checkpoint),
            "--timesteps",
            str(timesteps),
            "--log-dir",
            str(run_dir),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            *TRAIN,
            "--n-envs",
            "2",
            "--timesteps",
            "10000000",
            "--set",
            "n_steps=8",
            "--log-dir",
            str(run_dir),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_training(run_dir: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    episodes = run_dir / "episodes.csv"
    while time.monotonic() < deadline and process.poll() is None:
        if episodes.is_file() and len(episodes.read_text().splitlines()) > 5:
            return
        time.sleep(0.2)
    raise AssertionError(f"training did not start: {process.communicate()}")


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)]
)
def test_a_signal_stops_between_updates_and_saves_a_consistent_checkpoint(
    tmp_path: Path, signum: int
) -> None:
    run_dir = tmp_path / "run"
    process = _start(run_dir)
    _wait_for_training(run_dir, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum
    checkpoint = run_dir / "checkpoint.zip"
    assert f"resume with --resume {checkpoint}" in err
    model = ACKTR.load(checkpoint)
    # every counted step was trained on: steps = updates × n_steps × n_envs
    assert model.num_timesteps == model._n_updates * 8 * 2 > 0

    resumed = tmp_path / "resumed"
    target = model.num_timesteps + 160
    _resume(checkpoint, resumed, target)
    # the resumed run takes the preset's 8 envs: whole rollouts of 64 steps
    assert target <= ACKTR.load(resumed / "model.zip").num_timesteps < target + 64
    assert json.loads((resumed / "config.json").read_text())["resumed_from"] == str(checkpoint)


def _steps(path: Path, column: str) -> list[int]:
    import csv

    with open(path, newline="") as handle:
        return [int(float(row[column])) for row in csv.DictReader(handle) if row[column]]


@pytest.mark.slow  # three killed runs and six resumes (~60 s)
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killed_at_a_random_point_the_run_resumes_cleanly_and_reproducibly(
    tmp_path: Path, signum: int
) -> None:
    import random

    import torch

    run_dir = tmp_path / "run"
    process = _start(run_dir, "--checkpoint-every", "3", "--log-interval", "1")
    checkpoint = run_dir / "checkpoint.zip"
    deadline = time.monotonic() + 120
    while not checkpoint.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(random.Random(signum).uniform(0.0, 2.0))  # somewhere in an update or a save
    process.send_signal(signum)
    process.communicate(timeout=120)
    start = ACKTR.load(checkpoint).num_timesteps  # the checkpoint loads
    target = start + 320
    twice = [tmp_path / "a", tmp_path / "b"]
    for folder in twice:
        _resume(checkpoint, folder, target, "--n-envs", "2", "--log-interval", "1")
    for folder in twice:
        episodes = _steps(folder / "episodes.csv", "timesteps")
        progress = _steps(folder / "progress.csv", "time/total_timesteps")
        assert episodes == sorted(episodes) and progress == sorted(progress)
        assert len(set(progress)) >= len(progress) - 1  # only the final row may repeat a step
        killed = [s for s in _steps(run_dir / "episodes.csv", "timesteps") if s <= start]
        assert episodes[: len(killed)] == killed and all(s > start for s in episodes[len(killed) :])
    first, second = (ACKTR.load(folder / "checkpoint.zip") for folder in twice)
    assert first.num_timesteps == second.num_timesteps >= target
    for p, q in zip(first.policy.parameters(), second.policy.parameters(), strict=True):
        assert torch.equal(p, q)
