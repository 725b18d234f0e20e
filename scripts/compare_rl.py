"""ACKTR against SB3's A2C and PPO and sb3-contrib's TRPO and RecurrentPPO: sample
efficiency and wall-clock.

Every algorithm runs with its preset (agents/presets.toml; TRPO with rl-zoo3's settings
for sb3-contrib), the same timesteps and the same seeds (and on the classic tasks the
same number of environments; on Atari and MuJoCo each preset's own), in this one process,
one after the other. ``ALGO:NAME`` runs a named preset
(``acktr:baselines``). Reported per environment and algorithm: the mean return of the last
100 training episodes at the task's marks (e.g. 1M and 1.5M steps, as published curves
are read), the timesteps until the mean return of the last 20 training episodes first
reaches the threshold, the final return (20 evaluation episodes), and the wall-clock per
1000 timesteps; medians over seeds. Writes a JSON file (after every run, so a stopped
comparison keeps its finished runs), a Markdown table and a PNG of the learning curves;
each run's episodes go to ``OUT.runs/`` as they finish.

    python scripts/compare_rl.py --suite classic --seeds 3 --out docs/compare_rl_classic
    python scripts/compare_rl.py --suite mujoco --seeds 1 --seed-start 0 --algos npg:kfac \
        --out /tmp/mujoco_npg_s0
    python scripts/compare_rl.py --suite atari --envs Breakout --seeds 1 --seed-start 2 \
        --algos acktr --out /tmp/breakout_acktr_s2

    python scripts/compare_rl.py --suite masked --seeds 3 --out docs/compare_rl_masked

Runs split over several processes (``--algos acktr`` in one, ``--algos a2c`` in another)
are put into one table and plot afterwards with ``--merge A.json B.json --out OUT``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from ngrl.agents.callbacks import EpisodeLog
from ngrl.agents.checkpoints import has_normalizer, load_normalizer
from ngrl.agents.evaluation import evaluate
from ngrl.agents.plots import read_episodes, rolling_mean
from ngrl.agents.presets import algorithm_class, resolve_config
from ngrl.agents.records import run_clock
from ngrl.envs import make_vec_env, resolve
from ngrl.helpers import source_commit


@dataclass(frozen=True)
class Task:
    env: str
    timesteps: int
    n_envs: int | None  # None: each algorithm's preset chooses (MuJoCo presets differ)
    threshold: float
    marks: tuple[int, ...] = ()  # timesteps at which the mean training return is read


SUITES: dict[str, list[Task]] = {
    "classic": [
        Task("CartPole", 100_000, 8, 475.0),
        Task("InvertedPendulum", 100_000, 8, 950.0),
    ],
    # Each algorithm with its rl-zoo3 preset's envs (ACKTR and A2C 16, PPO 8). Pong's
    # threshold: a 20-episode mean of 0, winning as many points as it loses.
    "atari": [
        Task("Breakout", 1_500_000, None, 10.0, (500_000, 1_000_000, 1_500_000)),
        Task("Pong", 1_500_000, None, 0.0, (500_000, 1_000_000, 1_500_000)),
    ],
    # Thresholds near tianshou's TRPO at 1M; each algorithm with its preset's envs.
    "mujoco": [
        Task("HalfCheetah", 1_000_000, None, 3000.0, (300_000, 500_000, 1_000_000)),
        Task("Walker2d", 1_000_000, None, 3000.0, (300_000, 500_000, 1_000_000)),
        Task("Hopper", 1_000_000, None, 2500.0, (300_000, 500_000, 1_000_000)),
    ],
    # The tasks without velocities (memory needed): recurrent ACKTR against sb3-contrib's
    # RecurrentPPO (rl-zoo3's presets) and memory-less ACKTR, the control that must fail.
    "masked": [
        Task("CartPoleNoVel", 100_000, 8, 475.0, (25_000, 50_000, 100_000)),
        # 300k: recurrent ACKTR's preset (RecurrentPPO's rl-zoo3 budget is 100k). A random
        # policy scores about -1200, rl-zoo3's trained RecurrentPPO -267 (deterministic).
        Task("PendulumNoVel", 300_000, None, -600.0, (100_000, 200_000, 300_000)),
    ],
}
ALGOS = {
    "classic": ["acktr", "a2c", "ppo", "trpo-sb3"],
    "atari": ["acktr", "a2c", "ppo"],
    # ngrl's natural-gradient agents (NPG with the K-FAC preconditioner: npg:kfac) and the
    # first-order and TRPO peers.
    "mujoco": ["acktr", "npg:kfac", "trpo", "ppo", "trpo-sb3"],
    "masked": ["acktr-lstm", "ppo-lstm", "acktr"],
}
#: Published curves drawn beside the runs: openai/baselines' means of 6 seeds on
#: BreakoutNoFrameskip-v4 (its benchmark page), mean return at 1M, 1.5M and 2M steps.
ANCHORS: dict[str, dict[str, list[tuple[float, float]]]] = {
    "Breakout": {
        "baselines ACKTR": [(1e6, 10.9), (1.5e6, 22.3), (2e6, 38.3)],
        "baselines A2C": [(1e6, 2.9), (1.5e6, 8.2), (2e6, 18.9)],
        "baselines PPO2": [(1e6, 22.1), (1.5e6, 32.1), (2e6, 47.5)],
    },
    # tianshou's MuJoCo benchmark (10 seeds), mean return at 1M steps.
    "HalfCheetah": {
        "tianshou TRPO": [(1e6, 4471.0)],
        "tianshou NPG": [(1e6, 3485.0)],
        "tianshou PPO": [(1e6, 5784.0)],
    },
    "Walker2d": {
        "tianshou TRPO": [(1e6, 3827.0)],
        "tianshou NPG": [(1e6, 2503.0)],
        "tianshou PPO": [(1e6, 3589.0)],
    },
    "Hopper": {"tianshou NPG": [(1e6, 1915.0)]},
}
WINDOW = 20
MARK_WINDOW = 100  # episodes averaged at a mark (openai/baselines' curves)
#: What every run in an ``OUT.json`` carries (what a merge reads).
RUN_KEYS = (
    "algo",
    "env",
    "seed",
    "timesteps",
    "n_envs",
    "ms_per_1000_steps",
    "steps_to_threshold",
    "final_return",
    "curve_steps",
    "curve_returns",
)


def build_config(label: str, task: Task) -> Any:
    """The run settings of ``label`` (``algo`` or ``algo:preset``) on ``task``."""
    algo, _, preset = label.partition(":")
    algo = "trpo" if algo == "trpo-sb3" else algo
    algorithm_class(algo)  # an unknown name lists the valid ones
    return resolve_config(algo, resolve(task.env), [], preset or None)


def build(label: str, task: Task, seed: int) -> Any:
    """The model of ``label`` for ``task``, with its preset and the shared budget."""
    algo = label.partition(":")[0]
    spec = resolve(task.env)
    config = build_config(label, task)
    config.timesteps = task.timesteps  # schedules follow the shared budget
    env = make_vec_env(spec.gym_id, task.n_envs or config.n_envs, seed=seed)
    env = config.normalized(env)
    if algo == "trpo-sb3":
        from sb3_contrib import TRPO

        # sb3-contrib's TRPO with the preset's rollout and critic settings.
        keys = (
            "n_steps",
            "batch_size",
            "gamma",
            "gae_lambda",
            "target_kl",
            "cg_max_steps",
            "n_critic_updates",
            "learning_rate",
        )
        kwargs = {k: v for k, v in config.algorithm_kwargs().items() if k in keys}
        return TRPO(config.policy, env, seed=seed, device="cpu", **kwargs)
    return algorithm_class(algo)(
        config.policy, env, seed=seed, device="cpu", **config.algorithm_kwargs()
    )


def steps_to_threshold(steps: np.ndarray, returns: np.ndarray, threshold: float) -> float | None:
    if len(returns) == 0:
        return None
    reached = np.nonzero(rolling_mean(returns, WINDOW) >= threshold)[0]
    return float(steps[reached[0]]) if len(reached) else None


def return_at(steps: np.ndarray, returns: np.ndarray, mark: int) -> float | None:
    """Mean return of the last ``MARK_WINDOW`` training episodes ended by ``mark``."""
    done = returns[steps <= mark][-MARK_WINDOW:]
    return float(done.mean()) if len(done) else None


def returns_at_marks(
    steps: np.ndarray, returns: np.ndarray, env: str, timesteps: int
) -> dict[str, float | None]:
    """:func:`return_at` at each mark of ``env``'s task that the run reached."""
    task = task_of(env)
    marks = task.marks if task is not None else ()
    return {str(m): return_at(steps, returns, m) for m in marks if m <= timesteps}


def task_of(env: str) -> Task | None:
    """The suites' task on ``env`` (its threshold and marks), if there is one."""
    return next((t for tasks in SUITES.values() for t in tasks if t.env == env), None)


def run(algo: str, task: Task, seed: int, folder: Path) -> dict[str, Any]:
    model = build(algo, task, seed)
    log = folder / f"{algo.replace(':', '-')}-{task.env}-s{seed}.csv"
    start = time.perf_counter()
    model.learn(task.timesteps, callback=EpisodeLog(log))
    seconds = time.perf_counter() - start
    steps, returns = read_episodes(log)
    result = {
        "algo": algo,
        "env": task.env,
        "seed": seed,
        "timesteps": task.timesteps,
        "n_envs": model.n_envs,
        "seconds": seconds,
        "ms_per_1000_steps": 1000.0 * seconds / task.timesteps * 1000.0,
        "steps_to_threshold": steps_to_threshold(steps, returns, task.threshold),
        "return_at": returns_at_marks(steps, returns, task.env, task.timesteps),
        "final_return": evaluate(model, task.env, 20, seed + 10_000)["mean_return"],
        "curve_steps": steps.tolist(),
        "curve_returns": returns.tolist(),
    }
    model.get_env().close()
    return result


def _median(values: list[float | None]) -> float | None:
    """Median over seeds; a seed that never reached the threshold counts as infinity."""
    if not values:
        return None
    numbers = [np.inf if v is None else v for v in values]
    value = float(np.median(numbers))
    return None if not np.isfinite(value) else value


def _marks(results: list[dict[str, Any]]) -> list[int]:
    return sorted({int(m) for r in results for m in r.get("return_at", {})})


def summarise(results: list[dict[str, Any]], tasks: list[Task], algos: list[str]) -> str:
    marks = _marks(results)
    mark_heads = "".join(f" return at {m / 1e6:g}M (median [min, max]) |" for m in marks)
    lines = [
        "| env | algorithm | seeds |" + mark_heads + " steps to threshold (median) "
        "| final return (median) | ms per 1000 steps (median) | ÷ A2C wall-clock "
        "| ÷ A2C steps to threshold |",
        "|---|---|---:|" + "---:|" * len(marks) + "---:|---:|---:|---:|---:|",
    ]
    for task in tasks:
        rows = {a: [r for r in results if r["algo"] == a and r["env"] == task.env] for a in algos}
        a2c_ms = _median([r["ms_per_1000_steps"] for r in rows.get("a2c", [])])
        a2c_steps = _median([r["steps_to_threshold"] for r in rows.get("a2c", [])])
        for algo in algos:
            if not rows[algo]:
                continue
            ms = _median([r["ms_per_1000_steps"] for r in rows[algo]])
            steps = _median([r["steps_to_threshold"] for r in rows[algo]])
            finals = [r["final_return"] for r in rows[algo] if r["final_return"] is not None]
            final = f"{float(np.median(finals)):.1f}" if finals else "—"
            reached = sum(r["steps_to_threshold"] is not None for r in rows[algo])
            ratio_ms = f"{ms / a2c_ms:.2f}" if ms and a2c_ms else "—"
            ratio_steps = f"{steps / a2c_steps:.2f}" if steps and a2c_steps else "—"
            at = "".join(f" {_mark_cell(rows[algo], m)} |" for m in marks)
            lines.append(
                f"| {task.env} (≥ {task.threshold:g}) | {algo} | {reached}/{len(rows[algo])} reached "
                f"|{at} {_steps_text(steps)} | {final} | {ms:.0f} | {ratio_ms} | {ratio_steps} |"
            )
    return "\n".join(lines)


def per_seed(results: list[dict[str, Any]], tasks: list[Task], algos: list[str]) -> str:
    """Every run on a row of its own, in the summary's order, seeds ascending."""
    marks = _marks(results)
    lines = [
        "| env | algorithm | seed |"
        + "".join(f" return at {m / 1e6:g}M |" for m in marks)
        + " steps to threshold | final return | ms per 1000 steps |",
        "|---|---|---:|" + "---:|" * len(marks) + "---:|---:|---:|",
    ]
    for task in tasks:
        for algo in algos:
            runs = [r for r in results if r["algo"] == algo and r["env"] == task.env]
            for r in sorted(runs, key=lambda r: r["seed"]):
                at = "".join(f" {_mark_cell([r], m)} |" for m in marks)
                steps = r["steps_to_threshold"]
                final = r["final_return"]
                lines.append(
                    f"| {task.env} | {algo} | {r['seed']} |{at} "
                    f"{_steps_text(steps)} | "
                    f"{'—' if final is None else f'{final:.1f}'} | {r['ms_per_1000_steps']:.0f} |"
                )
    return "\n".join(lines)


def _steps_text(steps: float | None) -> str:
    return "not reached" if steps is None else f"{steps:,.0f}"


def _mark_cell(runs: list[dict[str, Any]], mark: int) -> str:
    values = [r.get("return_at", {}).get(str(mark)) for r in runs]
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{float(np.median(values)):.1f} [{min(values):.1f}, {max(values):.1f}]"


def results_json(
    command: list[str],
    results: list[dict[str, Any]],
    merged_from: list[dict[str, Any]] | None = None,
) -> str:
    """Every run with its curve, one run per line (the curves are long), and the commit
    of the code; a merge also keeps the commands and commits of the files it merged."""
    runs = ",\n  ".join(json.dumps(r) for r in results)
    sources = f'"merged_from": {json.dumps(merged_from)}, ' if merged_from else ""
    return (
        f'{{"command": {json.dumps(command)}, "commit": {json.dumps(source_commit())}, '
        f'{sources}"torch_threads": 1, "results": [\n  {runs}\n]}}\n'
    )


def plot(results: list[dict[str, Any]], tasks: list[Task], algos: list[str], png: Path) -> None:
    figure = Figure(figsize=(6.5 * len(tasks), 4.2))
    axes = figure.subplots(1, len(tasks), squeeze=False)
    legends = []
    for ax, task in zip(axes[0], tasks, strict=True):
        grid = np.linspace(0, task.timesteps, 200)
        for index, algo in enumerate(algos):
            curves = []
            for r in results:
                if r["algo"] == algo and r["env"] == task.env and r["curve_steps"]:
                    smooth = rolling_mean(np.array(r["curve_returns"]), WINDOW)
                    curves.append(
                        np.interp(grid, r["curve_steps"], smooth, left=np.nan, right=np.nan)
                    )
            if not curves:
                continue
            stack = np.array(curves)
            with warnings.catch_warnings():  # grid points outside every seed's episodes
                warnings.simplefilter("ignore", RuntimeWarning)
                label = legend_label(algo)
                ax.plot(grid, np.nanmedian(stack, 0), color=f"C{index}", label=label, linewidth=2)
                if len(curves) > 1:
                    ax.fill_between(
                        grid,
                        np.nanmin(stack, 0),
                        np.nanmax(stack, 0),
                        color=f"C{index}",
                        alpha=0.15,
                    )
        for (name, points), marker in zip(ANCHORS.get(task.env, {}).items(), "osd", strict=False):
            shown = [(x, y) for x, y in points if x <= task.timesteps]
            if shown:
                ax.plot(
                    *zip(*shown, strict=True),
                    linestyle="--",
                    marker=marker,
                    color="gray",
                    linewidth=1,
                    label=f"{name} (published)",
                )
        ax.axhline(task.threshold, color="gray", linestyle=":", linewidth=1)
        ax.set_title(f"{task.env} ({task.n_envs} envs)" if task.n_envs else task.env)
        ax.set_xlabel("timesteps")
        ax.set_ylabel(f"return (mean of last {WINDOW} episodes)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run too short for an episode has no curve
            # below the axes, so that no curve is hidden; the saved image grows to hold it
            legend = ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize="small")
            legend.set_in_layout(False)
            legends.append(legend)
    figure.tight_layout()
    figure.savefig(png, dpi=110, bbox_inches="tight", bbox_extra_artists=legends)


def legend_label(algo: str, width: int = 48) -> str:
    """``algo``, broken after commas into lines of at most ``width`` characters where its
    settings are long (``acktr[cg_steps=0,damping=0.01,...]``)."""
    lines = [""]
    for piece in algo.split(","):
        if lines[-1] and len(lines[-1]) + len(piece) + 1 > width:
            lines[-1] += ","
            lines.append(piece)
        else:
            lines[-1] += ("," if lines[-1] else "") + piece
    return "\n".join(lines)


def origin_config(config: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of the run that a resumed run continues, through every resume
    whose folder is still there (``config`` itself when it was not resumed): its preset,
    ``--set`` overrides and seed are the resumed run's too."""
    seen: set[Path] = set()
    while config.get("resumed_from"):
        parent = Path(config["resumed_from"]).parent / "config.json"
        if parent in seen or not parent.is_file():
            break
        seen.add(parent)
        config = json.loads(parent.read_text())
    return config


def run_folder_results(folder: Path, eval_episodes: int = 20) -> dict[str, Any]:
    """One run of ``python -m ngrl.train`` (its folder) as a comparison run: its training
    episodes, its wall-clock, and ``eval_episodes`` evaluation episodes of its
    ``model.zip``, scored as :func:`run` scores (0: no final return). A run stopped early
    counts up to its last ``checkpoint.zip``; a resumed run is named and seeded as the run
    it continues (:func:`origin_config`)."""
    config = json.loads((folder / "config.json").read_text())
    origin = origin_config(config)
    preset = origin.get("preset", "default")
    label = config["algo"] if preset == "default" else f"{config['algo']}:{preset}"
    command = origin.get("command") or []
    overrides = [command[i + 1] for i, word in enumerate(command[:-1]) if word == "--set"]
    if overrides:  # not the preset as it stands: say how it differs
        label += f"[{','.join(overrides)}]"
    env = resolve(config["env"]).name.split("/")[-1].split("-v")[0]
    steps, returns = read_episodes(folder / "episodes.csv")
    seconds = run_clock(
        np.loadtxt(folder / "episodes.csv", delimiter=",", skiprows=1, usecols=3, ndmin=1)
    )
    saved = folder / "model.zip"
    if not saved.is_file():
        saved = folder / "checkpoint.zip"
    normalizer = None
    if has_normalizer(saved):  # its evaluation sees observations as training saw them
        normalizer = load_normalizer(saved, make_vec_env(config["env"], int(config["n_envs"])))
    model = algorithm_class(config["algo"]).load(saved, env=normalizer, device="cpu")
    timesteps = int(model.num_timesteps)
    keep = steps <= timesteps  # episodes after the checkpoint were never saved
    steps, returns, seconds = steps[keep], returns[keep], seconds[keep]
    if not len(steps):
        raise ValueError("no episode finished before its last save")
    seed = int(origin["seed"])
    task = task_of(env)
    run = {
        "algo": label,
        "env": env,
        "seed": seed,
        "timesteps": timesteps,
        "n_envs": int(config["n_envs"]),
        "seconds": float(seconds[-1]),
        "ms_per_1000_steps": 1e6 * float(seconds[-1]) / float(steps[-1]),
        "steps_to_threshold": steps_to_threshold(
            steps, returns, task.threshold if task is not None else np.inf
        ),
        "return_at": returns_at_marks(steps, returns, env, timesteps),
        "final_return": (
            evaluate(model, env, eval_episodes, seed + 10_000)["mean_return"]
            if eval_episodes
            else None
        ),
        "curve_steps": steps.tolist(),
        "curve_returns": returns.tolist(),
    }
    return {"command": config.get("command"), "commit": config.get("commit"), "results": [run]}


def split_label(item: str) -> tuple[str, str] | None:
    """``OLD=NEW`` split at the first ``=`` outside brackets, since the names of runs with
    ``--set`` overrides hold some (``acktr[kl_clip=0.002]=acktr``); ``None`` without one."""
    depth = 0
    for i, char in enumerate(item):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "=" and depth == 0:
            return item[:i], item[i + 1 :]
    return None


def merged_results(
    paths: list[Path],
    eval_episodes: int = 20,
    labels: dict[str, str] | None = None,
) -> tuple[list[dict[str, Any]], list[Task], list[str], list[dict[str, Any]]]:
    """The runs of several earlier ``OUT.json`` files, with their tasks, algorithms and
    the commands that made them; ``labels`` renames algorithms (old name to new)."""
    results: list[dict[str, Any]] = []
    sources: list[dict[str, Any]] = []
    seen: dict[tuple[str, str, int], Path] = {}
    for path in paths:
        try:
            data = (
                run_folder_results(path, eval_episodes)
                if path.is_dir()
                else json.loads(path.read_text())
            )
            runs = data["results"]
            for r in runs:
                missing = [k for k in RUN_KEYS if k not in r]
                if missing:
                    raise KeyError(", ".join(missing))
                r["algo"] = (labels or {}).get(r["algo"], r["algo"])
            keys = [(r["algo"], r["env"], int(r["seed"])) for r in runs]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"--merge: {path} is neither a compare_rl.py JSON file nor an "
                f"ngrl.train run folder ({error})"
            ) from None
        for key in keys:
            if key in seen:
                raise ValueError(
                    f"--merge: {path} and {seen[key]} both hold {'/'.join(map(str, key))}"
                )
            seen[key] = path
        for r in runs:  # files written before the marks existed: read them off the curve
            if "return_at" not in r:
                r["return_at"] = returns_at_marks(
                    np.array(r["curve_steps"]),
                    np.array(r["curve_returns"]),
                    r["env"],
                    r["timesteps"],
                )
        results.extend(runs)
        source = {"file": path.name, "command": data.get("command"), "commit": data.get("commit")}
        if data.get("merged_from"):  # a merge of merges keeps the whole history
            source["merged_from"] = data["merged_from"]
        sources.append(source)
    tasks: dict[str, Task] = {}
    for r in results:
        previous = tasks.get(r["env"])
        timesteps = max(r["timesteps"], previous.timesteps if previous else 0)
        n_envs = r["n_envs"] if previous is None or previous.n_envs == r["n_envs"] else None
        known = task_of(r["env"])
        tasks[r["env"]] = Task(
            r["env"], timesteps, n_envs, known.threshold if known is not None else np.inf
        )
    algos = list(dict.fromkeys(r["algo"] for r in results))
    return results, list(tasks.values()), algos, sources


def write_outputs(
    out: Path,
    command: list[str],
    results: list[dict[str, Any]],
    tasks: list[Task],
    algos: list[str],
    merged_from: list[dict[str, Any]] | None = None,
) -> None:
    """``OUT.json`` (every run), ``OUT.md`` (the table, then every seed's row) and
    ``OUT.png`` (the curves)."""
    table = summarise(results, tasks, algos)
    out.with_suffix(".json").write_text(results_json(command, results, merged_from))
    seeds = per_seed(results, tasks, algos)
    out.with_suffix(".md").write_text(f"{table}\n\nEvery seed:\n\n{seeds}\n")
    plot(results, tasks, algos, out.with_suffix(".png"))
    print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--suite",
        choices=sorted(SUITES),
        default="classic",
        help="classic: CartPole and InvertedPendulum (8 envs each); atari: Breakout and Pong "
        "at 1.5M steps; mujoco: HalfCheetah, Walker2d and Hopper at 1M steps (atari and "
        "mujoco: each algorithm with its preset's envs)",
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="number of seeds (default: 3), from --seed-start on"
    )
    parser.add_argument(
        "--seed-start",
        type=int,
        default=0,
        metavar="K",
        help="first seed (default: 0): seeds K..K+N-1, so that the seeds of "
        "one comparison can run in separate processes",
    )
    parser.add_argument("--timesteps", type=int, help="override every task's budget")
    parser.add_argument(
        "--envs", help="comma-separated subset of the suite's environments (default: all)"
    )
    parser.add_argument(
        "--algos",
        help="comma-separated algorithms (default: the suite's); ALGO:NAME "
        "runs ALGO's named preset, e.g. acktr:baselines",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="run nothing: combine the runs of earlier OUT.json files and "
        "of `python -m ngrl.train` run folders (evaluated here)",
    )
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="with --merge: show algorithm OLD as NEW, e.g. when a preset has changed "
        "since its runs (acktr=acktr[kl_clip=0.001]); repeatable",
    )
    parser.add_argument(
        "--eval-episodes",
        type=int,
        default=20,
        metavar="N",
        help="with --merge: evaluation episodes of each run folder's model "
        "(default: 20; 0: none, the table shows no final return)",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output prefix: writes OUT.json, OUT.md and OUT.png"
    )
    args = parser.parse_args(argv)
    command = ["scripts/compare_rl.py", *(sys.argv[1:] if argv is None else argv)]
    for name, value, minimum in (
        ("--eval-episodes", args.eval_episodes, 0),
        ("--seeds", args.seeds, 1),
        ("--seed-start", args.seed_start, 0),
    ):
        if value < minimum:
            print(f"compare_rl: {name} must be >= {minimum}, got {value}", file=sys.stderr)
            return 2
    try:  # before any training, so that a bad --out costs nothing
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"compare_rl: --out {args.out}: {error.strerror}", file=sys.stderr)
        return 2
    pairs = [split_label(item) for item in args.label]
    if not all(pair is not None and all(pair) for pair in pairs):
        print(f"compare_rl: --label takes OLD=NEW, got {args.label}", file=sys.stderr)
        return 2
    labels = dict(pair for pair in pairs if pair is not None)
    if len(labels) != len(pairs):
        print(f"compare_rl: --label names one OLD twice: {args.label}", file=sys.stderr)
        return 2
    if labels and not args.merge:
        print("compare_rl: --label renames the runs of a --merge; give --merge", file=sys.stderr)
        return 2
    if args.merge:
        try:
            write_outputs(
                args.out, command, *merged_results(args.merge, args.eval_episodes, labels)
            )
        except ValueError as error:
            print(f"compare_rl: {error}", file=sys.stderr)
            return 2
        return 0
    torch.set_num_threads(1)
    suite = SUITES[args.suite]
    chosen = [e.strip() for e in args.envs.split(",")] if args.envs else [t.env for t in suite]
    unknown = sorted(set(chosen) - {t.env for t in suite})
    if unknown:
        print(
            f"compare_rl: --envs {', '.join(unknown)} not in the {args.suite} suite "
            f"({', '.join(t.env for t in suite)})",
            file=sys.stderr,
        )
        return 2
    tasks = [
        Task(t.env, args.timesteps or t.timesteps, t.n_envs, t.threshold, t.marks)
        for t in suite
        if t.env in chosen
    ]
    algos = args.algos.split(",") if args.algos else ALGOS[args.suite]
    seeds = range(args.seed_start, args.seed_start + args.seeds)
    jobs = [(a, t, s) for t in tasks for s in seeds for a in algos]
    for algo in algos:  # a misspelt algorithm or preset stops here, not after hours
        try:
            build_config(algo, tasks[0])
        except ValueError as error:
            print(f"compare_rl: --algos: {error}", file=sys.stderr)
            return 2
    runs_folder = args.out.with_name(args.out.name + ".runs")
    runs_folder.mkdir(exist_ok=True)
    results = []
    for algo, task, seed in tqdm(jobs, desc="runs", unit="run"):
        results.append(run(algo, task, seed, runs_folder))
        write_outputs(args.out, command, results, tasks, algos)
    return 0


if __name__ == "__main__":
    sys.exit(main())
