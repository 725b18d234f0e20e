"""scripts/compare_rl.py: runs split over processes merge into one table and plot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from ngrl.helpers import source_commit
from tests.helpers.scripts import load_script


def test_runs_of_two_processes_merge_into_one_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_script("compare_rl")
    for algo in ("acktr", "a2c"):
        assert (
            script.main(
                [
                    "--suite",
                    "classic",
                    "--seeds",
                    "1",
                    "--timesteps",
                    "1000",
                    "--algos",
                    algo,
                    "--out",
                    str(tmp_path / algo),
                ]
            )
            == 0
        )
    capsys.readouterr()
    merged = tmp_path / "merged"
    assert (
        script.main(
            [
                "--merge",
                str(tmp_path / "acktr.json"),
                str(tmp_path / "a2c.json"),
                "--out",
                str(merged),
            ]
        )
        == 0
    )
    data = json.loads(merged.with_suffix(".json").read_text())
    assert [source["command"][-1] for source in data["merged_from"]] == [
        str(tmp_path / "acktr"),
        str(tmp_path / "a2c"),
    ]
    assert data["commit"] == source_commit()
    assert [source["commit"] for source in data["merged_from"]] == [source_commit()] * 2
    runs = data["results"]
    assert sorted((r["algo"], r["env"]) for r in runs) == sorted(
        (a, e) for a in ("acktr", "a2c") for e in ("CartPole", "InvertedPendulum")
    )
    summary, every_seed = merged.with_suffix(".md").read_text().split("\n\nEvery seed:\n\n")
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in summary.splitlines()[2:]]
    rows = {(row[0].split(" ")[0], row[1]): row for row in cells}
    seed_rows = [[c.strip() for c in line.split("|")[1:-1]] for line in every_seed.splitlines()[2:]]
    assert sorted((row[0], row[1], row[2], row[-2]) for row in seed_rows) == sorted(
        (r["env"], r["algo"], str(r["seed"]), f"{r['final_return']:.1f}") for r in runs
    )
    assert set(rows) == {(e, a) for e in ("CartPole", "InvertedPendulum") for a in ("acktr", "a2c")}
    for env in ("CartPole", "InvertedPendulum"):
        ms = {r["algo"]: r["ms_per_1000_steps"] for r in runs if r["env"] == env}
        wall_clock_ratio = float(rows[env, "acktr"][6])
        assert wall_clock_ratio == pytest.approx(ms["acktr"] / ms["a2c"], abs=0.006)
        assert rows[env, "a2c"][6] == "1.00"
    assert merged.with_suffix(".png").stat().st_size > 0
    # merged again with nothing new, the file keeps where its runs came from
    again = tmp_path / "again"
    assert script.main(["--merge", str(merged.with_suffix(".json")), "--out", str(again)]) == 0
    (source,) = json.loads(again.with_suffix(".json").read_text())["merged_from"]
    assert source["file"] == "merged.json" and source["merged_from"] == data["merged_from"]


def test_a_file_that_is_not_its_json_is_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    script = load_script("compare_rl")
    assert script.main(["--merge", str(bad), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.json" in err[0]
    assert not (tmp_path / "m.md").exists()


def _one_run(**changes: object) -> dict[str, object]:
    run: dict[str, object] = {
        "algo": "acktr",
        "env": "CartPole",
        "seed": 0,
        "timesteps": 100,
        "n_envs": 2,
        "ms_per_1000_steps": 50.0,
        "steps_to_threshold": None,
        "final_return": 9.0,
        "curve_steps": [50.0, 100.0],
        "curve_returns": [9.0, 10.0],
    }
    run.update(changes)
    return run


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ([_one_run()], "both hold acktr/CartPole/0"),
        ([{k: v for k, v in _one_run(seed=1).items() if k != "n_envs"}], "n_envs"),
    ],
    ids=["the same run twice", "a run without n_envs"],
)
def test_merging_inconsistent_files_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], second: list[dict], message: str
) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"command": [], "results": [_one_run()]}))
    (tmp_path / "b.json").write_text(json.dumps({"command": [], "results": second}))
    script = load_script("compare_rl")
    assert (
        script.main(
            [
                "--merge",
                str(tmp_path / "a.json"),
                str(tmp_path / "b.json"),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not list(tmp_path.glob("m.*"))


def test_a_merge_renames_the_runs_of_a_changed_preset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The same algorithm and seed twice, run before and after its preset changed.
    (tmp_path / "old.json").write_text(json.dumps({"command": [], "results": [_one_run()]}))
    (tmp_path / "new.json").write_text(
        json.dumps({"command": [], "results": [_one_run(algo="acktr[kl_clip=0.002]")]})
    )
    merge = ["--merge", str(tmp_path / "old.json"), str(tmp_path / "new.json")]
    labels = ["--label", "acktr=acktr[kl_clip=0.001]", "--label", "acktr[kl_clip=0.002]=acktr"]
    script = load_script("compare_rl")
    assert script.main([*merge, *labels, "--out", str(tmp_path / "m")]) == 0
    algos = [r["algo"] for r in json.loads((tmp_path / "m.json").read_text())["results"]]
    assert algos == ["acktr[kl_clip=0.001]", "acktr"]
    _, tasks, _, _ = script.merged_results([tmp_path / "old.json", tmp_path / "new.json"])
    assert tasks[0].n_envs == 2  # the plot's title names it: every run had 2 envs
    assert "| acktr[kl_clip=0.001] |" in (tmp_path / "m.md").read_text()
    capsys.readouterr()
    for bad in (["--label", "acktr"], ["--label", "=acktr"], ["--label", "acktr[a=1]"]):
        assert script.main([*merge, *bad, "--out", str(tmp_path / "b")]) == 2
        assert "--label takes OLD=NEW" in capsys.readouterr().err
    twice = ["--label", "acktr=a", "--label", "acktr=b"]
    assert script.main([*merge, *twice, "--out", str(tmp_path / "b")]) == 2
    assert "names one OLD twice" in capsys.readouterr().err
    assert script.main([*labels, "--out", str(tmp_path / "b")]) == 2
    assert "give --merge" in capsys.readouterr().err
    assert not list(tmp_path.glob("b.*"))


def test_an_out_that_cannot_be_made_stops_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    script = load_script("compare_rl")
    assert script.main(["--suite", "classic", "--out", str(blocker / "sub" / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0]


def test_a_named_preset_runs_from_a_chosen_seed_and_keeps_its_episodes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_script("compare_rl")
    out = tmp_path / "cmp"
    assert (
        script.main(
            [
                "--suite",
                "classic",
                "--seeds",
                "1",
                "--seed-start",
                "4",
                "--timesteps",
                "1000",
                "--algos",
                "acktr:baselines",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    runs = json.loads(out.with_suffix(".json").read_text())["results"]
    assert {(r["algo"], r["seed"]) for r in runs} == {("acktr:baselines", 4)}
    episodes = sorted(p.name for p in (tmp_path / "cmp.runs").iterdir())
    assert episodes == [
        "acktr-baselines-CartPole-s4.csv",
        "acktr-baselines-InvertedPendulum-s4.csv",
    ]


def test_returns_at_the_marks_are_means_of_the_last_100_episodes() -> None:
    script = load_script("compare_rl")
    steps = np.arange(1, 301) * 10.0
    returns = np.arange(300.0)
    assert script.return_at(steps, returns, 1000) == pytest.approx(np.mean(np.arange(0, 100)))
    assert script.return_at(steps, returns, 3000) == pytest.approx(np.mean(np.arange(200, 300)))
    assert script.return_at(steps, returns, 5) is None
    table = script.summarise(
        [_one_run(seed=s, return_at={"1000000": v}) for s, v in enumerate((3.0, 1.0, 8.0))],
        [script.Task("CartPole", 100, 2, 475.0)],
        ["acktr"],
    )
    assert "return at 1M" in table and "| 3.0 [1.0, 8.0] |" in table


@pytest.mark.parametrize("algos", ["acktrr", "acktr:nope"])
def test_an_unknown_algorithm_or_preset_stops_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], algos: str
) -> None:
    script = load_script("compare_rl")
    assert (
        script.main(
            ["--suite", "classic", "--seeds", "1", "--algos", algos, "--out", str(tmp_path / "x")]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compare_rl: --algos:")
    assert not (tmp_path / "x.json").exists()


def test_a_training_run_folder_merges_as_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ngrl.train import main as train

    folder = tmp_path / "run"
    assert (
        train(
            [
                "acktr",
                "--env",
                "CartPole",
                "--timesteps",
                "2000",
                "--n-envs",
                "2",
                "--seed",
                "3",
                "--no-progress",
                "--eval-episodes",
                "0",
                "--set",
                "damping=0.02",
                "--log-dir",
                str(folder),
            ]
        )
        == 0
    )
    # Resumed (here with other envs' seed) into a new folder: still that run, overrides and all.
    more = tmp_path / "more"
    resume = ["--resume", str(folder / "checkpoint.zip"), "--seed", "0", "--log-dir", str(more)]
    common = ["--n-envs", "2", "--no-progress", "--eval-episodes", "0"]
    assert train(["acktr", "--env", "CartPole", "--timesteps", "3000", *common, *resume]) == 0
    script = load_script("compare_rl")
    (tmp_path / "a2c.json").write_text(
        json.dumps({"command": [], "results": [_one_run(algo="a2c")]})
    )
    assert (
        script.main(
            ["--merge", str(folder), str(tmp_path / "a2c.json"), "--out", str(tmp_path / "m")]
        )
        == 0
    )
    assert (
        script.main(["--merge", str(more), "--eval-episodes", "0", "--out", str(tmp_path / "r")])
        == 0
    )
    resumed = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert (resumed["algo"], resumed["seed"], resumed["timesteps"]) == (
        "acktr[damping=0.02]",
        3,
        3000,
    )
    # The clock goes on over the resume; older records restarted it at zero, and their
    # run's time is the sum of its stretches.
    rows = [line.split(",") for line in (more / "episodes.csv").read_text().splitlines()[1:]]
    seconds = [float(row[3]) for row in rows]
    assert seconds == sorted(seconds) and resumed["seconds"] == seconds[-1]
    kept = len([row for row in rows if int(row[0]) <= 2000])
    old = [*(100.0 + i for i in range(kept)), *(1.0 + i for i in range(len(rows) - kept))]
    (more / "episodes.csv").write_text(
        "timesteps,return,length,seconds\n"
        + "".join(f"{','.join(row[:3])},{s}\n" for row, s in zip(rows, old, strict=True))
    )
    assert (
        script.main(["--merge", str(more), "--eval-episodes", "0", "--out", str(tmp_path / "r")])
        == 0
    )
    resumed = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert resumed["seconds"] == 100.0 + kept - 1 + len(rows) - kept
    capsys.readouterr()
    data = json.loads((tmp_path / "m.json").read_text())
    run = next(r for r in data["results"] if r["algo"] == "acktr[damping=0.02]")
    assert (run["env"], run["seed"], run["timesteps"], run["n_envs"]) == ("CartPole", 3, 2000, 2)
    steps = [
        int(line.split(",")[0]) for line in (folder / "episodes.csv").read_text().splitlines()[1:]
    ]
    assert run["curve_steps"] == steps and run["final_return"] > 0
    assert data["merged_from"][0]["command"][:4] == ["python", "-m", "ngrl.train", "acktr"]
    assert data["merged_from"][0]["commit"] == source_commit()


def test_a_run_stopped_before_its_end_counts_to_its_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ngrl.train import main as train

    folder = tmp_path / "run"
    assert (
        train(
            [
                "acktr",
                "--env",
                "CartPole",
                "--timesteps",
                "960",
                "--n-envs",
                "2",
                "--no-progress",
                "--eval-episodes",
                "0",
                "--checkpoint-every",
                "20",
                "--set",
                "n_steps=8",
                "--log-dir",
                str(folder),
            ]
        )
        == 0
    )
    # As if killed after its checkpoint at 960 steps: no model.zip, and episodes past it.
    (folder / "model.zip").unlink()
    with (folder / "episodes.csv").open("a") as file:
        file.write("1500,99.0,10,1.0\n")  # an episode the checkpoint never saw
    script = load_script("compare_rl")
    assert script.main(["--merge", str(folder), "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    run = json.loads((tmp_path / "m.json").read_text())["results"][0]
    assert run["timesteps"] == 960
    assert max(run["curve_steps"]) <= 960 and 99.0 not in run["curve_returns"]


def test_a_file_without_marks_gets_them_from_its_curve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _one_run(
        env="Breakout",
        timesteps=1_500_000,
        curve_steps=[400_000.0, 900_000.0, 1_200_000.0],
        curve_returns=[2.0, 4.0, 9.0],
    )
    (tmp_path / "old.json").write_text(json.dumps({"command": [], "results": [run]}))
    script = load_script("compare_rl")
    assert script.main(["--merge", str(tmp_path / "old.json"), "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    merged = json.loads((tmp_path / "m.json").read_text())["results"][0]
    assert merged["return_at"] == {"500000": 2.0, "1000000": 3.0, "1500000": 5.0}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--seed-start", "-1"], "--seed-start must be >= 0"),
        (["--eval-episodes", "-2"], "--eval-episodes must be >= 0"),
    ],
)
def test_bad_counts_stop_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    script = load_script("compare_rl")
    assert script.main(["--suite", "classic", *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(
    ("suite", "env", "algos"),
    [
        ("mujoco", "Walker2d", {"acktr", "npg:kfac", "trpo", "ppo"}),
        ("atari", "Pong", {"acktr", "a2c", "ppo"}),
    ],
)
def test_a_suite_builds_every_algorithm_with_its_presets_envs(
    suite: str, env: str, algos: set[str]
) -> None:
    compare = load_script("compare_rl")
    bench_extra = importlib.util.find_spec("sb3_contrib") is not None  # for trpo-sb3
    labels = [label for label in compare.ALGOS[suite] if label != "trpo-sb3" or bench_extra]
    assert algos <= set(labels)
    task = next(task for task in compare.SUITES[suite] if task.env == env)
    env_counts = set()
    for label in labels:
        model = compare.build(label, task, seed=0)
        assert model.n_envs == compare.build_config(label, task).n_envs, label
        env_counts.add(model.n_envs)
        if label == "npg:kfac":
            assert model.actor_kfac is not None  # K-FAC preconditions, not conjugate gradient
        model.env.close()
    assert len(env_counts) > 1  # the presets' own counts, not one forced on all
    for task in compare.SUITES[suite]:  # every task has its env and its published marks
        assert compare.resolve(task.env).family == suite and task.marks[-1] == task.timesteps


def test_merged_runs_with_different_env_counts_name_none(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"command": [], "results": [_one_run()]}))
    (tmp_path / "b.json").write_text(
        json.dumps({"command": [], "results": [_one_run(algo="a2c", n_envs=16)]})
    )
    script = load_script("compare_rl")
    _, tasks, _, _ = script.merged_results([tmp_path / "a.json", tmp_path / "b.json"])
    assert tasks[0].n_envs is None  # 2 and 16: the plot's title names no count


@pytest.mark.parametrize(
    "algo",
    [
        "acktr",
        "acktr[cg_steps=0,damping=0.01,momentum=0.9]",
        "acktr[" + ",".join(["x=1"] * 40) + "]",
    ],
)
def test_a_long_label_breaks_after_commas_into_short_lines(algo: str) -> None:
    label = load_script("compare_rl").legend_label(algo, width=20)
    assert label.replace("\n", "") == algo
    lines = label.split("\n")
    # a line is over the width only when it is one piece with no comma to break at
    assert all(len(line) <= 20 or "," not in line.rstrip(",") for line in lines)
    assert all(line.endswith(",") for line in lines[:-1])


def test_every_seed_gets_its_own_row_in_seed_order(tmp_path: Path) -> None:
    runs = [
        _one_run(seed=2, final_return=30.0, steps_to_threshold=80.0),
        _one_run(seed=0, final_return=10.0),
        _one_run(seed=1, final_return=20.0, ms_per_1000_steps=70.0),
    ]
    (tmp_path / "a.json").write_text(json.dumps({"command": [], "results": runs}))
    script = load_script("compare_rl")
    assert script.main(["--merge", str(tmp_path / "a.json"), "--out", str(tmp_path / "m")]) == 0
    summary, every_seed = (tmp_path / "m.md").read_text().split("\n\nEvery seed:\n\n")
    (median,) = [line for line in summary.splitlines() if "| acktr |" in line]
    assert "| 1/3 reached |" in median and "| 20.0 | 50 |" in median
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in every_seed.splitlines()[2:]]
    assert [(row[2], row[-3], row[-2], row[-1]) for row in rows] == [
        ("0", "not reached", "10.0", "50"),
        ("1", "not reached", "20.0", "70"),
        ("2", "80", "30.0", "50"),
    ]
