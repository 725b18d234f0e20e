"""The training run behind ``python -m ngrl.train ALGO --env NAME``: an agent with its
published settings, in a run folder.

A run writes, into its own folder: ``config.json`` (with the command and the code's
commit), ``progress.csv`` and TensorBoard
events (SB3's logger, every ``--log-interval`` updates and at the end), ``episodes.csv``
(every episode), ``checkpoint.zip`` (everything a run continues from, every
``--checkpoint-every`` updates and at the end, written atomically), ``model.zip`` (the
policy, for ``predict``), ``eval.json`` and ``learning_curve.png``. Bad input ends the
command with one line on stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from stable_baselines3.common.utils import set_random_seed

from ngrl import distributed
from ngrl.helpers import add_override_option, source_commit

__all__ = ["main"]

EXIT_USAGE = 2
_REPORT_GRACE_S = 30.0  # how long other ranks wait for rank 0 to report a usage error


class UsageError(Exception):
    """Input the user can fix: reported in one line, exit status 2."""


def _hyperparameter_help(algo: str) -> str:
    from ngrl.agents.presets import hyperparameter_defaults

    lines = [f"hyperparameters of {algo} (set with --set key=value; presets may change them):"]
    for name, default in hyperparameter_defaults(algo).items():
        lines.append(f"  {name} = {default!r}")
    lines += [
        "run settings (also with --set; the flags above set the first two):",
        "  n_envs, timesteps",
        "  policy = 'MlpPolicy' (the algorithm's policy name, e.g. CnnPolicy)",
        "  normalize = False (SB3's VecNormalize on observations and rewards)",
        "  normalize_reward = True (with normalize: scale rewards too)",
        "  schedule_timesteps = 0 (lin_X schedules decay over this many steps; 0: the run)",
    ]
    return "\n".join(lines)


def build_parser(algo_hint: str | None = None) -> argparse.ArgumentParser:
    from ngrl.agents.presets import ALGORITHMS

    epilog = (
        _hyperparameter_help(algo_hint)
        if algo_hint in ALGORITHMS
        else "`python -m ngrl.train ALGO --help` lists ALGO's hyperparameters and defaults."
    )
    parser = argparse.ArgumentParser(
        prog="python -m ngrl.train",
        description=(
            "Train an RL agent with its published settings (agents/presets.toml). "
            "Example: python -m ngrl.train acktr --env Breakout"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog,
    )
    parser.add_argument("algo", metavar="ALGO", help=f"one of: {', '.join(ALGORITHMS)}")
    parser.add_argument(
        "--env",
        required=True,
        metavar="NAME",
        help="short name (Breakout, HalfCheetah, CartPole) or a gymnasium id",
    )
    parser.add_argument(
        "--timesteps",
        type=int,
        metavar="N",
        help="total environment steps of the run (default: the preset's)",
    )
    parser.add_argument(
        "--n-envs", type=int, metavar="N", help="parallel environments (default: the preset's)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        help="random seed (default: 0; with --resume, the seed of the checkpoint's run)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the networks run (default: auto, the GPU if there is one)",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        metavar="DIR",
        help="run folder; must not exist or be empty (default: runs/ALGO-ENV-sSEED-TIME)",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="PATH",
        help="continue from the checkpoint.zip of an earlier run (same ALGO "
        "and env) in a new run folder; --timesteps counts the earlier "
        "steps too",
    )
    parser.add_argument(
        "--eval-episodes",
        type=int,
        default=10,
        metavar="N",
        help="episodes to evaluate the final policy on (default: 10; 0: none)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        metavar="UPDATES",
        help="save checkpoint.zip every this many updates, and at the end (default: 100)",
    )
    parser.add_argument(
        "--log-interval",
        type=int,
        default=10,
        metavar="UPDATES",
        help="write progress.csv and TensorBoard every this many updates, "
        "and at the end (default: 10)",
    )
    parser.add_argument(
        "--preset",
        metavar="NAME",
        help="a named preset instead of ALGO's default one, e.g. "
        "`acktr --preset baselines` (openai/baselines' ACKTR recipe); "
        "an unknown name lists ALGO's presets",
    )
    add_override_option(
        parser,
        'override a hyperparameter (a TOML value: 0.1, true, "x", {a = 1}); KEY.SUB sets '
        "one entry of a table, e.g. --set kfac_kwargs.weight_sharing=reduce; repeatable",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="under torchrun: how long a rank waits for the others before "
        "stopping with an error, e.g. when one has died (default: 300)",
    )
    return parser


def _check_positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{name} must be >= {minimum}, got {value}")


def _run_dir(args: argparse.Namespace, gym_id: str) -> Path:
    if args.log_dir is not None:
        run_dir: Path = args.log_dir
        if run_dir.exists() and not run_dir.is_dir():
            raise UsageError(f"--log-dir {str(run_dir)!r} is a file, not a folder")
        blocking = next((p for p in run_dir.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise UsageError(
                f"--log-dir {str(run_dir)!r}: {str(blocking)!r} is a file, not a folder"
            )
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UsageError(
                f"--log-dir {str(run_dir)!r} exists and is not empty; choose a new folder"
            )
        return run_dir
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = gym_id.split("/")[-1]
    base = Path("runs") / f"{args.algo}-{name}-s{args.seed}-{stamp}"
    run_dir, suffix = base, 1
    while run_dir.exists():
        suffix += 1
        run_dir = base.with_name(f"{base.name}-{suffix}")
    return run_dir


def _start_distributed(args: argparse.Namespace) -> None:
    """Under torchrun (``WORLD_SIZE`` > 1): join the process group, pick this rank's device.

    NCCL when the ranks run on GPUs, gloo otherwise; each rank takes ``cuda:LOCAL_RANK``.
    An unavailable ``--device cuda`` is left for :func:`_prepare` to report.
    """
    from datetime import timedelta

    import torch.distributed as dist

    from ngrl.envs import rank_info

    info = rank_info()
    if info.world_size == 1:
        return
    if args.dist_timeout <= 0:
        raise UsageError(f"--dist-timeout must be > 0, got {args.dist_timeout}")
    use_cuda = args.device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
        args.device = f"cuda:{info.local_rank}"
    elif args.device == "auto":
        args.device = "cpu"
    dist.init_process_group(
        "nccl" if use_cuda else "gloo", timeout=timedelta(seconds=args.dist_timeout)
    )


def _check_distributed(args: argparse.Namespace, config: Any, world: int) -> None:
    if world == 1:
        return
    if args.algo != "acktr":
        raise UsageError(
            f"{args.algo} cannot run on several ranks yet; under torchrun use acktr "
            "(or run it without torchrun)"
        )
    if config.n_envs % world:
        raise UsageError(
            f"--n-envs {config.n_envs} cannot be split evenly over {world} ranks; "
            f"use a multiple of {world}"
        )


def _make_env(config: Any, seed: int, resume: Path | None) -> Any:
    from ngrl.agents.checkpoints import has_normalizer, load_normalizer
    from ngrl.envs import make_vec_env

    env = make_vec_env(config.env.gym_id, config.n_envs, seed=seed)
    if not config.normalize:
        return env
    if resume is not None and has_normalizer(resume):
        return load_normalizer(resume, env)
    return config.normalized(env)


def _prepare(args: argparse.Namespace) -> tuple[Any, Any, Path]:
    """Everything that can fail on bad input, before a file is written: (config, model, dir)."""
    from ngrl.agents.checkpoints import has_normalizer, read_run_metadata
    from ngrl.agents.presets import algorithm_class, parse_override, resolve_config
    from ngrl.envs import resolve

    cls = algorithm_class(args.algo)
    spec = resolve(args.env)
    overrides = [parse_override(text) for text in args.overrides]
    for name, value in (
        ("--timesteps", args.timesteps),
        ("--n-envs", args.n_envs),
        ("--checkpoint-every", args.checkpoint_every),
        ("--log-interval", args.log_interval),
    ):
        _check_positive(name, value)
    _check_positive("--eval-episodes", args.eval_episodes, minimum=0)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
    world = distributed.world_size()
    if args.resume is not None:
        if overrides:
            raise UsageError(
                "--set cannot change the hyperparameters of a resumed run (they come from "
                "the checkpoint); start a new run to change them"
            )
        metadata = read_run_metadata(args.resume)
        if (metadata.get("algo"), metadata.get("env")) != (args.algo, spec.gym_id):
            raise UsageError(
                f"checkpoint {str(args.resume)!r} was trained by {metadata.get('algo')} on "
                f"{metadata.get('env')}, not {args.algo} on {spec.gym_id}"
            )
        done = metadata["num_timesteps"]
        if args.seed is None:  # the same run goes on (checkpoints before seeds were saved: 0)
            args.seed = metadata.get("seed", 0)
        if args.timesteps is not None and args.timesteps < done:
            raise UsageError(
                f"--timesteps {args.timesteps:,} is below the {done:,} steps the checkpoint has "
                "trained (--timesteps counts them too); give more to continue"
            )
    if args.seed is None:
        args.seed = 0
    config = resolve_config(args.algo, spec, overrides, args.preset)
    if args.timesteps is not None:
        config.timesteps = args.timesteps
    if args.n_envs is not None:
        config.n_envs = args.n_envs
    _check_positive("n_envs", config.n_envs)
    _check_distributed(args, config, world)
    if args.resume is not None:  # the checkpoint decides, not today's preset
        config.normalize = has_normalizer(args.resume)
    run_dir = _run_dir(args, spec.gym_id)
    env = _make_env(config, args.seed, args.resume)
    try:
        if args.resume is not None:
            model = cls.load(args.resume, env=env, device=args.device)
        else:
            try:
                model = cls(
                    config.policy,
                    env,
                    seed=args.seed,
                    device=args.device,
                    **config.algorithm_kwargs(),
                )
            except (TypeError, ValueError) as error:
                given = ", ".join(name for name, _ in overrides) or "none"
                raise UsageError(
                    f"{args.algo} cannot be built with this run's settings "
                    f"(--set: {given}): {error}"
                ) from error
    except BaseException:
        env.close()
        raise
    if world > 1:
        # Rank 0's parameters are everyone's (broadcast when the model was built); each
        # rank samples its own actions.
        set_random_seed(args.seed + distributed.rank())
    return config, model, run_dir


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    args.command = ["python", "-m", "ngrl.train", *argv]  # recorded in config.json
    try:
        _start_distributed(args)
    except (UsageError, ValueError) as error:  # before the ranks can agree: rank 0 speaks
        if os.environ.get("RANK", "0") == "0":
            print(f"ngrl.train: error: {error}", file=sys.stderr)
        else:
            # Every rank fails the same check. A rank that exited first would make torchrun
            # kill rank 0 before it could print, so the others give it time to report
            # (torchrun stops them as soon as rank 0 exits).
            time.sleep(_REPORT_GRACE_S)
        return EXIT_USAGE
    code: int | None = None
    try:
        code = _train(args)
    except distributed.DistributedError as error:
        print(f"ngrl.train: error: {error}", file=sys.stderr)
        code = 1
    finally:
        distributed.finish(code)  # under torchrun, ranks other than 0 end here
    return code


def _learn(
    model: Any,
    timesteps: int,
    fresh: bool,
    callbacks: list[Any] | None = None,
    log_interval: int = 10,
) -> None:
    """Train until the run's ``timesteps`` (a resumed model has already done some),
    logging every ``log_interval`` updates.

    SIGTERM and SIGINT stop it between two updates (:class:`ngrl.agents.callbacks.Stopped`),
    on every rank at the same update.
    """
    from stable_baselines3.common.callbacks import CallbackList

    from ngrl.agents.callbacks import StopOnSignal

    remaining = timesteps - model.num_timesteps
    if remaining <= 0:
        return
    stop = StopOnSignal(agree=lambda received: not distributed.all_agree(not received))
    stop.install()
    try:
        model.learn(
            remaining,
            callback=CallbackList([stop, *(callbacks or [])]),
            reset_num_timesteps=fresh,
            log_interval=log_interval,
        )
        if distributed.is_distributed():
            import torch.distributed as dist

            # Every rank leaves training together: a rank that tore its process group down
            # while another was still finishing the last collective aborted at times
            # (std::terminate in 1 of 10 two-rank runs).
            dist.barrier()
    finally:
        stop.restore()


def _train(args: argparse.Namespace) -> int:
    from ngrl.agents.callbacks import Stopped

    failure: Exception | None = None
    try:
        config, model, run_dir = _prepare(args)
    except (UsageError, ValueError, TypeError) as error:
        failure = error
    # Under torchrun every rank checks the input; if one fails, all stop (none waits).
    if not distributed.all_agree(failure is None):
        rank0_failed = not distributed.broadcast_object(failure is None, 0)
        if failure is not None and (distributed.rank() == 0 or not rank0_failed):
            print(f"ngrl.train: error: {failure}", file=sys.stderr)
        return EXIT_USAGE
    leader = distributed.rank() == 0
    if not leader:  # rank 0 alone writes, logs and evaluates
        from stable_baselines3.common.logger import Logger

        model.set_logger(Logger(folder=None, output_formats=[]))
        try:
            _learn(model, config.timesteps, args.resume is None, log_interval=args.log_interval)
        except Stopped as stop:
            return 128 + stop.signum
        except KeyboardInterrupt:
            return 130
        finally:
            model.get_env().close()
        return 0

    from stable_baselines3.common.logger import configure

    from ngrl.agents.callbacks import EpisodeLog, FinalLog, PeriodicCheckpoint, ScoreProgressBar
    from ngrl.agents.checkpoints import save_checkpoint, save_policy
    from ngrl.agents.evaluation import evaluate
    from ngrl.agents.plots import plot_learning_curve
    from ngrl.agents.records import continue_episodes, continue_progress

    run_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"algo": args.algo, "env": config.env.gym_id, "seed": args.seed}
    normalizer = model.get_vec_normalize_env()
    (run_dir / "config.json").write_text(
        json.dumps(
            {
                **metadata,
                "n_envs": config.n_envs,
                "timesteps": config.timesteps,
                "policy": config.policy,
                "normalize": config.normalize,
                # What the run's normaliser does (a resumed run's comes from its checkpoint).
                "normalize_reward": bool(normalizer is not None and normalizer.norm_reward),
                "device": str(model.device),
                "resumed_from": str(args.resume) if args.resume else None,
                "preset": args.preset or "default",
                # A resumed run keeps the hyperparameters saved in its checkpoint.
                "hyperparameters": "from the checkpoint" if args.resume else config.hyperparameters,
                "command": args.command,
                "commit": source_commit(),
            },
            indent=2,
            default=repr,
        )
    )
    episodes = run_dir / "episodes.csv"
    logger = configure(str(run_dir), ["csv", "tensorboard"])
    seconds = 0.0
    if args.resume is not None:  # one continuous curve, up to the checkpoint's step
        seconds = continue_episodes(
            args.resume.parent / "episodes.csv", episodes, model.num_timesteps
        )
        continue_progress(args.resume.parent / "progress.csv", logger, model.num_timesteps)
    model.set_logger(logger)
    checkpoint = run_dir / "checkpoint.zip"
    callbacks = [
        EpisodeLog(episodes, seconds),
        FinalLog(),
        PeriodicCheckpoint(
            args.checkpoint_every, lambda: save_checkpoint(model, checkpoint, metadata)
        ),
    ]
    if not args.no_progress:
        callbacks.insert(0, ScoreProgressBar(config.timesteps))
    ranks = distributed.world_size()
    where = f"device {model.device}" + (f" on each of {ranks} ranks" if ranks > 1 else "")
    print(
        f"ngrl.train: {args.algo} on {config.env.gym_id}, {config.n_envs} envs, "
        f"{config.timesteps:,} timesteps, {where}; run folder {run_dir}"
    )
    try:
        _learn(model, config.timesteps, args.resume is None, callbacks, args.log_interval)
    except Stopped as stop:
        save_checkpoint(model, checkpoint, metadata)
        print(
            f"\nngrl.train: stopped by {signal.Signals(stop.signum).name} after "
            f"{model.num_timesteps:,} timesteps; resume with --resume {checkpoint}",
            file=sys.stderr,
        )
        return 128 + stop.signum
    except KeyboardInterrupt:  # a second signal: in the middle of an update, nothing saved
        print(
            f"\nngrl.train: stopped at once; the last checkpoint is {checkpoint}"
            if checkpoint.is_file()
            else "\nngrl.train: stopped at once, before any checkpoint",
            file=sys.stderr,
        )
        return 130
    save_checkpoint(model, checkpoint, metadata)
    save_policy(model, run_dir / "model.zip", metadata)
    print(f"model: {run_dir / 'model.zip'} (checkpoint: {checkpoint})")
    if episodes.is_file():
        curve = run_dir / "learning_curve.png"
        plot_learning_curve([episodes], curve, f"{args.algo} on {config.env.gym_id}")
        print(f"curve: {curve}")
    if args.eval_episodes:
        result = evaluate(model, config.env.gym_id, args.eval_episodes, args.seed + 10_000)
        (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
        print(
            f"eval: {result['mean_return']:.1f} ± {result['std_return']:.1f} over "
            f"{args.eval_episodes} episodes"
        )
    model.get_env().close()
    return 0
