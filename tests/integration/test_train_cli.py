"""`python -m ngrl.train`: every algorithm runs, resumes, and rejects bad input cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ngrl.agents import ACKTR
from ngrl.helpers import source_commit
from ngrl.train import main
from tests.helpers.oracle import state_tensors

SMALL = ["--n-envs", "2", "--no-progress", "--eval-episodes", "2"]
# Enough for a few updates of every algorithm on 2 environments.
ALGO_SETTINGS = {
    "acktr": ["--set", "n_steps=8"],
    "npg": ["--set", "n_steps=64", "--set", "batch_size=64"],
    "trpo": ["--set", "n_steps=64", "--set", "batch_size=64"],
    "a2c": [],
    "ppo": ["--set", "n_steps=64", "--set", "batch_size=64", "--set", "n_epochs=1"],
}


def train(tmp_path: Path, name: str, *args: str) -> tuple[int, Path]:
    run_dir = tmp_path / name
    return main([*args, "--log-dir", str(run_dir)]), run_dir


@pytest.mark.parametrize("algo", sorted(ALGO_SETTINGS))
def test_every_algorithm_trains_and_writes_its_run_folder(algo: str, tmp_path: Path) -> None:
    code, run_dir = train(
        tmp_path,
        algo,
        algo,
        "--env",
        "CartPole",
        "--timesteps",
        "384",
        *SMALL,
        *ALGO_SETTINGS[algo],
    )
    assert code == 0
    files = {p.name for p in run_dir.iterdir()}
    assert {
        "config.json",
        "progress.csv",
        "episodes.csv",
        "model.zip",
        "eval.json",
        "learning_curve.png",
    } <= files
    assert any(name.startswith("events.out.tfevents") for name in files)
    assert not any(name.endswith(".part") for name in files)
    assert json.loads((run_dir / "eval.json").read_text())["episodes"] == 2
    config = json.loads((run_dir / "config.json").read_text())
    assert config["algo"] == algo
    assert config["commit"] == source_commit()  # the code that ran, where known
    assert (config["normalize"], config["normalize_reward"]) == (False, False)


def test_acktr_on_atari_through_the_cli(tmp_path: Path) -> None:
    code, run_dir = train(
        tmp_path,
        "atari",
        "acktr",
        "--env",
        "Breakout",
        "--timesteps",
        "160",
        "--n-envs",
        "2",
        "--no-progress",
        "--eval-episodes",
        "0",
        "--set",
        "n_steps=8",
    )
    assert code == 0
    model = ACKTR.load(run_dir / "checkpoint.zip")
    assert type(model.policy).__name__ == "KFACActorCriticCnnPolicy"
    assert model.policy.optimizer.blocks["features_extractor.cnn.0"].initialized


def test_acktr_runs_with_another_curvature_on_atari(tmp_path: Path) -> None:
    # The Atari preset's K-FAC options (factored damping) do not follow the switch.
    code, run_dir = train(
        tmp_path,
        "ekfac",
        "acktr",
        "--env",
        "Breakout",
        "--timesteps",
        "16",
        "--n-envs",
        "2",
        "--no-progress",
        "--eval-episodes",
        "0",
        "--set",
        "n_steps=8",
        "--set",
        "curvature=ekfac",
    )
    assert code == 0
    optimizer = ACKTR.load(run_dir / "checkpoint.zip").policy.optimizer
    assert optimizer.curvature == "ekfac"
    assert type(optimizer.blocks["features_extractor.cnn.0"]).__name__ == "EKFACBlock"
    assert optimizer.blocks["features_extractor.cnn.0"].initialized


def test_set_reaches_kfac_options(tmp_path: Path) -> None:
    code, run_dir = train(
        tmp_path,
        "set",
        "acktr",
        "--env",
        "CartPole",
        "--timesteps",
        "64",
        *SMALL,
        "--set",
        "n_steps=8",
        "--set",
        "curvature=diag",
        "--set",
        "kfac_kwargs.stats_batch_size=4",
    )
    assert code == 0
    optimizer = ACKTR.load(run_dir / "checkpoint.zip").policy.optimizer
    assert optimizer.curvature == "diag"
    assert optimizer._capture.batch_size == 4


def test_preset_baselines_is_the_reference_recipe(tmp_path: Path) -> None:
    code, run_dir = train(
        tmp_path,
        "baselines",
        "acktr",
        "--env",
        "Breakout",
        "--preset",
        "baselines",
        "--timesteps",
        "160",
        "--n-envs",
        "2",
        "--no-progress",
        "--eval-episodes",
        "0",
        "--set",
        "n_steps=8",
    )
    assert code == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["preset"] == "baselines"
    optimizer = ACKTR.load(run_dir / "checkpoint.zip").policy.optimizer
    assert optimizer.curvature == "kfac" and optimizer.hyperparameter("kl_clip") == 1e-3


def test_resume_continues_the_step_counter_and_the_factors(tmp_path: Path) -> None:
    args = ["acktr", "--env", "CartPole", *SMALL]  # a resumed run keeps its hyperparameters
    assert (
        train(
            tmp_path,
            "first",
            *args,
            "--timesteps",
            "160",
            "--set",
            "n_steps=8",
            "--set",
            "cold_start_steps=1",
            "--seed",
            "3",
        )[0]
        == 0
    )
    first = ACKTR.load(tmp_path / "first" / "checkpoint.zip")
    code, second_dir = train(
        tmp_path,
        "second",
        *args,
        "--timesteps",
        "320",
        "--resume",
        str(tmp_path / "first" / "checkpoint.zip"),
    )
    assert code == 0
    second = ACKTR.load(second_dir / "checkpoint.zip")
    assert (first.num_timesteps, second.num_timesteps) == (160, 320)
    assert json.loads((second_dir / "config.json").read_text())["seed"] == 3  # the run's own
    assert second._n_updates == 2 * first._n_updates
    # Cold start is not repeated: every resumed update was a K-FAC step.
    assert second.policy.optimizer.steps == first.policy.optimizer.steps + first._n_updates
    # The curve continues the first run's episodes.
    first_rows = (tmp_path / "first" / "episodes.csv").read_text().splitlines()
    assert (second_dir / "episodes.csv").read_text().splitlines()[: len(first_rows)] == first_rows
    # Resumed with no steps left, the saved factors come back bit for bit.
    code, same_dir = train(
        tmp_path,
        "same",
        *args,
        "--timesteps",
        "160",
        "--resume",
        str(tmp_path / "first" / "checkpoint.zip"),
        "--seed",
        "5",
    )
    assert code == 0
    assert json.loads((same_dir / "config.json").read_text())["seed"] == 5  # unless told
    same = ACKTR.load(same_dir / "checkpoint.zip").policy.optimizer.state_dict()["state"]
    for index, entry in first.policy.optimizer.state_dict()["state"].items():
        restored = state_tensors(same[index])
        for key, value in state_tensors(entry).items():
            assert torch.equal(restored[key], value), key


def run_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    run_dir = tmp_path / "bad"
    code = main([*args, "--log-dir", str(run_dir), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("ngrl.train: error:")
    assert not run_dir.exists()
    return err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["acktrr", "--env", "CartPole"], "unknown algorithm 'acktrr'; choose one of: acktr"),
        (["acktr", "--env", "CartPoel"], "CartPole"),
        (
            ["acktr", "--env", "CartPole", "--set", "kl_clipp=0.1"],
            "no hyperparameter 'kl_clipp'; did you mean kl_clip",
        ),
        (["acktr", "--env", "CartPole", "--set", "n_steps=2.5"], "'n_steps' takes an integer"),
        (["acktr", "--env", "CartPole", "--set", "normalize_advantage=1"], "true or false"),
        (["acktr", "--env", "CartPole", "--set", "kl_clip=-1"], "Invalid kl_clip"),
        (
            ["acktr", "--env", "Pendulum", "--set", 'policy_kwargs={log_std_init="x"}'],
            "acktr cannot be built with this run's settings (--set: policy_kwargs)",
        ),
        (
            ["acktr", "--env", "CartPole", "--set", "learning_rate=lin_fast"],
            "'learning_rate' takes lin_X",
        ),
        (
            ["acktr", "--env", "CartPole", "--set", "kfac_kwargs.weight_sharing=x"],
            "Invalid weight_sharing",
        ),
        (["acktr", "--env", "CartPole", "--timesteps", "0"], "--timesteps must be >= 1"),
        (["acktr", "--env", "CartPole", "--log-interval", "0"], "--log-interval must be >= 1"),
        (["acktr", "--env", "CartPole", "--set", "trust_region=both"], "trust_region"),
        (["acktr", "--env", "CartPole", "--resume", "missing.zip"], "does not exist"),
        (
            ["acktr", "--env", "Breakout", "--preset", "basleines"],
            "acktr has no preset 'basleines'; its presets: baselines",
        ),
        (
            ["acktr", "--env", "CartPole", "--set", "schedule_timesteps=-5"],
            "schedule_timesteps must be >= 0",
        ),
        (["acktr", "--env", "CartPole", "--set", "n_steps=0"], "'n_steps' must be >= 1, got 0"),
        (["trpo", "--env", "CartPole", "--set", "n_steps=0"], "'n_steps' must be >= 1"),
        (["ppo", "--env", "CartPole", "--set", "n_epochs=0"], "'n_epochs' must be >= 1"),
        (["ppo", "--env", "CartPole", "--set", "batch_size=0"], "'batch_size' must be >= 1"),
        (["acktr", "--env", "CartPole", "--set", "timesteps=0"], "'timesteps' must be >= 1"),
        (["acktr", "--env", "CartPole", "--set", "max_grad_norm=0"], "'max_grad_norm' must be > 0"),
        (["acktr", "--env", "CartPole", "--set", "gamma=1.5"], "'gamma' must be in (0, 1]"),
        (["acktr", "--env", "CartPole", "--set", "ent_coef=-1"], "'ent_coef' must be >= 0"),
        (
            ["ppo", "--env", "CartPole", "--set", "learning_rate=lin_-1"],
            "'learning_rate' must be > 0",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in run_bad(tmp_path, capsys, *args)


def test_corrupt_or_foreign_checkpoints_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(b"PK\x03\x04 this is not a model")
    assert "not a saved model" in run_bad(
        tmp_path, capsys, "acktr", "--env", "CartPole", "--resume", str(corrupt)
    )
    assert train(tmp_path, "a2c", "a2c", "--env", "CartPole", "--timesteps", "40", *SMALL)[0] == 0
    capsys.readouterr()
    a2c_model = str(tmp_path / "a2c" / "checkpoint.zip")
    assert "was trained by a2c on CartPole-v1, not acktr" in run_bad(
        tmp_path, capsys, "acktr", "--env", "CartPole", "--resume", a2c_model
    )
    assert "not a2c on Acrobot" in run_bad(
        tmp_path, capsys, "a2c", "--env", "Acrobot", "--resume", a2c_model
    )


def test_resume_refuses_to_change_hyperparameters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        train(
            tmp_path,
            "run",
            "acktr",
            "--env",
            "CartPole",
            "--timesteps",
            "32",
            *SMALL,
            "--set",
            "n_steps=8",
        )[0]
        == 0
    )
    capsys.readouterr()
    message = run_bad(
        tmp_path,
        capsys,
        "acktr",
        "--env",
        "CartPole",
        "--resume",
        str(tmp_path / "run" / "checkpoint.zip"),
        "--set",
        "kl_clip=0.1",
    )
    assert "cannot change the hyperparameters of a resumed run" in message


def test_an_existing_run_folder_is_never_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    (run_dir / "model.zip").write_text("precious")
    code = main(["acktr", "--env", "CartPole", "--log-dir", str(run_dir), "--no-progress"])
    assert code == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (run_dir / "model.zip").read_text() == "precious"


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_log_dir_that_cannot_be_a_folder_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    log_dir = blocker if where == "a file" else blocker / "run"
    assert main(["acktr", "--env", "CartPole", "--log-dir", str(log_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a folder" in err[0]
    assert blocker.read_text() == "x"


def test_resume_refuses_fewer_timesteps_than_the_checkpoint_has(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        train(
            tmp_path,
            "first",
            "acktr",
            "--env",
            "CartPole",
            *SMALL,
            "--timesteps",
            "160",
            "--set",
            "n_steps=8",
        )[0]
        == 0
    )
    capsys.readouterr()
    err = run_bad(
        tmp_path,
        capsys,
        "acktr",
        "--env",
        "CartPole",
        "--timesteps",
        "100",
        "--resume",
        str(tmp_path / "first" / "checkpoint.zip"),
    )
    assert "--timesteps 100 is below the 160 steps the checkpoint has trained" in err


def test_help_lists_hyperparameters_with_defaults() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ngrl.train", "acktr", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for text in ("--env", "--resume", "--set", "kl_clip = 0.001", "vf_fisher_coef = 1.0"):
        assert text in out
    from ngrl.agents.presets import RUN_KEYS

    settings = out.split("run settings", 1)[1]
    assert all(key in settings for key in RUN_KEYS)  # every --set key is explained


def test_model_zip_holds_the_policy_and_checkpoint_zip_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import zipfile

    import numpy as np

    code, run_dir = train(
        tmp_path,
        "run",
        "acktr",
        "--env",
        "CartPole",
        "--timesteps",
        "160",
        *SMALL,
        "--set",
        "n_steps=8",
    )
    assert code == 0
    model_entries = set(zipfile.ZipFile(run_dir / "model.zip").namelist())
    checkpoint_entries = set(zipfile.ZipFile(run_dir / "checkpoint.zip").namelist())
    assert "policy.pth" in model_entries and "policy.optimizer.pth" not in model_entries
    assert {"policy.pth", "policy.optimizer.pth", "cold_optimizer.pth"} <= checkpoint_entries
    assert (run_dir / "model.zip").stat().st_size < (run_dir / "checkpoint.zip").stat().st_size
    policy, full = ACKTR.load(run_dir / "model.zip"), ACKTR.load(run_dir / "checkpoint.zip")
    obs = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_array_equal(
        policy.predict(obs, deterministic=True)[0], full.predict(obs, deterministic=True)[0]
    )
    assert not any(b.initialized for b in policy.policy.optimizer.blocks.values())
    capsys.readouterr()
    err = run_bad(
        tmp_path, capsys, "acktr", "--env", "CartPole", "--resume", str(run_dir / "model.zip")
    )
    assert "holds the trained policy only" in err and "resume from checkpoint.zip" in err


def test_a_run_shorter_than_the_log_interval_leaves_logs_and_a_checkpoint(tmp_path: Path) -> None:
    import csv

    # 4 updates: below the default --log-interval (10) and --checkpoint-every (100).
    code, run_dir = train(
        tmp_path,
        "short",
        "acktr",
        "--env",
        "CartPole",
        "--timesteps",
        "64",
        *SMALL,
        "--set",
        "n_steps=8",
    )
    assert code == 0
    with open(run_dir / "progress.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and int(rows[-1]["time/total_timesteps"]) == 64
    assert rows[-1]["train/policy_loss"] != ""  # the last update's figures are there
    assert ACKTR.load(run_dir / "checkpoint.zip").num_timesteps == 64
    code, every = train(
        tmp_path,
        "every",
        "acktr",
        "--env",
        "CartPole",
        "--timesteps",
        "64",
        *SMALL,
        "--set",
        "n_steps=8",
        "--log-interval",
        "1",
    )
    assert code == 0
    assert len((every / "progress.csv").read_text().splitlines()) == 1 + 4 + 1  # + the final row


def read_steps(path: Path, column: int | str = 0) -> list[int]:
    import csv

    with open(path, newline="") as handle:
        if isinstance(column, int):
            return [int(float(row[column])) for row in list(csv.reader(handle))[1:]]
        return [int(float(row[column])) for row in csv.DictReader(handle) if row[column]]


def test_a_resumed_run_drops_the_records_its_checkpoint_did_not_keep(tmp_path: Path) -> None:
    """A run killed after its checkpoint logged a stretch the resumed run trains again:
    the new records continue from the checkpoint's step, never twice, and its clock from
    the earlier run's."""
    args = ["acktr", "--env", "CartPole", *SMALL, "--set", "n_steps=8", "--log-interval", "1"]
    assert train(tmp_path, "first", *args, "--timesteps", "160")[0] == 0
    first = tmp_path / "first"
    # A first run that took an hour, and what a crash after its checkpoint (at 160) leaves:
    # records past it.
    rows = (first / "episodes.csv").read_text().splitlines()
    hour = [",".join([*row.split(",")[:3], str(3600.0 + i)]) for i, row in enumerate(rows[1:])]
    (first / "episodes.csv").write_text("\n".join([rows[0], *hour]) + "\n")
    with open(first / "episodes.csv", "a") as handle:
        handle.write("176,999.0,10,9999.0\n192,999.0,10,9999.0\n")
    progress = (first / "progress.csv").read_text().splitlines()
    header = progress[0].split(",")
    late = [""] * len(header)
    late[header.index("time/total_timesteps")] = "192"
    (first / "progress.csv").write_text("\n".join([*progress, ",".join(late)]) + "\n")

    code, second = train(
        tmp_path,
        "second",
        "acktr",
        "--env",
        "CartPole",
        *SMALL,
        "--log-interval",
        "1",
        "--timesteps",
        "320",
        "--resume",
        str(first / "checkpoint.zip"),
    )
    assert code == 0
    for path, column in (
        (second / "episodes.csv", 0),
        (second / "progress.csv", "time/total_timesteps"),
    ):
        steps = read_steps(path, column)
        assert steps == sorted(steps) and 160 < steps[-1] <= 320, (path.name, steps)
        assert read_steps(first / path.name, column)[: len([s for s in steps if s <= 160])] == [
            s for s in steps if s <= 160
        ]
    assert "999.0" not in (second / "episodes.csv").read_text()
    seconds = [
        float(row.split(",")[3]) for row in (second / "episodes.csv").read_text().split()[1:]
    ]
    kept = len([s for s in read_steps(second / "episodes.csv") if s <= 160])
    assert seconds == sorted(seconds) and 3600.0 <= seconds[kept - 1] < seconds[-1] < 9999.0


def test_vecnormalize_statistics_travel_inside_the_checkpoint(tmp_path: Path) -> None:
    import numpy as np

    from ngrl.agents.checkpoints import has_normalizer

    args = ["acktr", "--env", "CartPole", *SMALL, "--set", "n_steps=8", "--set", "normalize=true"]
    code, first = train(tmp_path, "first", *args, "--timesteps", "160")
    assert code == 0
    assert [p.name for p in first.iterdir() if p.suffix == ".pkl"] == []  # no second file
    assert has_normalizer(first / "checkpoint.zip") and has_normalizer(first / "model.zip")
    code, second = train(
        tmp_path,
        "second",
        "acktr",
        "--env",
        "CartPole",
        *SMALL,
        "--timesteps",
        "160",
        "--resume",
        str(first / "checkpoint.zip"),
    )
    assert code == 0  # nothing left to train: the statistics come back as they were saved
    from ngrl.agents.checkpoints import load_normalizer
    from ngrl.envs import make_vec_env

    saved = load_normalizer(first / "checkpoint.zip", make_vec_env("CartPole", 2))
    again = load_normalizer(second / "checkpoint.zip", make_vec_env("CartPole", 2))
    assert saved.obs_rms.count > 1
    np.testing.assert_array_equal(again.obs_rms.mean, saved.obs_rms.mean)
    for run in (first, second):  # CartPole's preset scales rewards when it normalises
        config = json.loads((run / "config.json").read_text())
        assert (config["normalize"], config["normalize_reward"]) == (True, True)
