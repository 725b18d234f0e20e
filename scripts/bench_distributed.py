"""Data-parallel ACKTR throughput: environment steps and updates per second on 1, 2, … ranks.

Each world size is a fresh job of spawned processes joined by ``torch.distributed`` (gloo
on CPUs, NCCL with ``--device cuda``; several processes share a GPU when there is only
one). The job trains ACKTR on ``--n-envs`` environments in total, split over the ranks,
exactly as ``torchrun -m ngrl.train acktr`` does, and reports the median over
``--repeats`` timed runs (after one warm-up update) of

* environment steps per second (all ranks' steps), and
* updates per second (each update is one synchronised K-FAC step of all ranks).

Example::

    python scripts/bench_distributed.py --env CartPole --n-envs 8 --ranks 1 2
    python scripts/bench_distributed.py --env Breakout --n-envs 16 --ranks 1 2 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    from ngrl.agents import ACKTR
    from ngrl.agents.presets import resolve_config
    from ngrl.distributed import finish
    from ngrl.envs import make_vec_env, resolve

    torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda"
    device = "cpu"
    if use_cuda:
        index = rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        device = f"cuda:{index}"
    dist.init_process_group(
        "nccl" if use_cuda else "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=300),
    )
    spec = resolve(args.env)
    config = resolve_config("acktr", spec, [])
    kwargs = config.algorithm_kwargs()
    env = make_vec_env(
        spec.gym_id, args.n_envs, seed=0, rank=rank, world_size=world, normalize=config.normalize
    )
    model = ACKTR(config.policy, env, seed=rank, device=device, **kwargs)
    per_update = model.n_steps * args.n_envs
    model.learn(per_update)  # warm-up: one update, buffers and first decompositions
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        start = time.perf_counter()
        model.learn(args.updates * per_update, reset_num_timesteps=False)
        if use_cuda:
            torch.cuda.synchronize()
        dist.barrier()
        times.append(time.perf_counter() - start)
    env.close()
    if rank == 0:
        seconds = statistics.median(times)
        Path(out).write_text(
            json.dumps(
                {
                    "ranks": world,
                    "env": spec.gym_id,
                    "n_envs": args.n_envs,
                    "device": args.device,
                    "updates": args.updates,
                    "steps_per_update": per_update,
                    "seconds": times,
                    "env_steps_per_s": args.updates * per_update / seconds,
                    "updates_per_s": args.updates / seconds,
                }
            )
        )
    finish(0)


def run(world: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        store, out = os.path.join(folder, "store"), os.path.join(folder, "result.json")
        mp.start_processes(
            _worker, args=(world, store, args, out), nprocs=world, start_method="spawn"
        )
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="CartPole", help="environment name (default: CartPole)")
    parser.add_argument(
        "--n-envs", type=int, default=8, help="environments over all ranks (default: 8)"
    )
    parser.add_argument(
        "--ranks", type=int, nargs="+", default=[1, 2], help="world sizes to measure (default: 1 2)"
    )
    parser.add_argument(
        "--updates", type=int, default=50, help="updates per timed run (default: 50)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (default: 3)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per rank (default: 1)"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu (gloo) or cuda (NCCL; ranks share GPUs round-robin)",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    for name in ("n_envs", "updates", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for world in args.ranks:
        if world < 1 or args.n_envs % world:
            parser.error(f"--ranks {world}: --n-envs {args.n_envs} must split evenly")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.out is not None and not args.out.resolve().parent.is_dir():
        parser.error(f"--out {args.out}: its folder does not exist")  # before the runs, not after
    results = [run(world, args) for world in args.ranks]
    base = results[0]
    print(
        f"ACKTR on {base['env']}, {args.n_envs} envs in total, {args.device}, "
        f"{args.updates} updates x {args.repeats} runs (median)"
    )
    print("| ranks | env steps/s | updates/s | ÷ first |")
    print("|---:|---:|---:|---:|")
    for result in results:
        ratio = result["env_steps_per_s"] / base["env_steps_per_s"]
        print(
            f"| {result['ranks']} | {result['env_steps_per_s']:,.0f} | "
            f"{result['updates_per_s']:.2f} | {ratio:.2f} |"
        )
    if args.out is not None:
        args.out.write_text(json.dumps({"command": sys.argv, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
