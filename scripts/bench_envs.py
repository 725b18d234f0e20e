"""Environment steps per second: ngrl's make_vec_env against SB3 and gymnasium, same run.

Each row steps the vector environment with random actions after a warm-up and reports
environment steps per second (agent steps summed over the environments; an Atari step is
4 emulator frames), median over --repeats timed windows. Peers:

  SB3 Dummy / Subproc   stable_baselines3's make_atari_env (+ VecFrameStack 4) or
                        make_vec_env, with DummyVecEnv or SubprocVecEnv
  gymnasium async       gymnasium's AsyncVectorEnv (Atari: AtariPreprocessing and
                        FrameStackObservation, the wrapper path)
  raw emulator          one ale-py environment on one thread: the per-core limit

    python scripts/bench_envs.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import ale_py
import gymnasium as gym
import numpy as np
from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation
from stable_baselines3.common.env_util import make_atari_env
from stable_baselines3.common.env_util import make_vec_env as sb3_make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecFrameStack

from ngrl.envs import make_vec_env

gym.register_envs(ale_py)


class GymnasiumStepper:
    """A gymnasium vector env behind the two methods the timer needs."""

    def __init__(self, env: gym.vector.VectorEnv) -> None:
        self.env = env
        self.num_envs = env.num_envs

    def reset(self) -> None:
        self.env.reset(seed=0)

    def step(self, actions: np.ndarray) -> None:
        self.env.step(actions)

    def close(self) -> None:
        self.env.close()


def steps_per_second(env: VecEnv | GymnasiumStepper, seconds: float, repeats: int) -> float:
    space = env.env.action_space if isinstance(env, GymnasiumStepper) else env.action_space
    single = (
        getattr(env.env, "single_action_space", None)
        if isinstance(env, GymnasiumStepper)
        else space
    )
    rng = np.random.default_rng(0)

    def actions() -> np.ndarray:
        if isinstance(single, gym.spaces.Discrete):
            return rng.integers(0, single.n, env.num_envs)
        return rng.uniform(single.low, single.high, (env.num_envs, *single.shape)).astype(
            single.dtype
        )

    env.reset()
    for _ in range(50):
        env.step(actions())
    rates = []
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            env.step(actions())
            count += 1
        rates.append(count * env.num_envs / (time.perf_counter() - start))
    env.close()
    return statistics.median(rates)


def atari_rows(n: int) -> dict[str, Callable[[], VecEnv | GymnasiumStepper]]:
    def gym_async() -> GymnasiumStepper:
        return GymnasiumStepper(
            gym.make_vec(
                "ALE/Breakout-v5",
                n,
                vectorization_mode="async",
                frameskip=1,
                repeat_action_probability=0.0,
                wrappers=[lambda e: FrameStackObservation(AtariPreprocessing(e), 4)],
            )
        )

    return {
        "ngrl make_vec_env (ale-py threads)": lambda: make_vec_env("Breakout", n, seed=0),
        "SB3 make_atari_env + DummyVecEnv": lambda: VecFrameStack(
            make_atari_env("BreakoutNoFrameskip-v4", n, seed=0, vec_env_cls=DummyVecEnv), 4
        ),
        "SB3 make_atari_env + SubprocVecEnv": lambda: VecFrameStack(
            make_atari_env("BreakoutNoFrameskip-v4", n, seed=0, vec_env_cls=SubprocVecEnv), 4
        ),
        "gymnasium AsyncVectorEnv + wrappers": gym_async,
    }


def gym_rows(name: str, gym_id: str, n: int) -> dict[str, Callable[[], VecEnv | GymnasiumStepper]]:
    return {
        "ngrl make_vec_env (auto)": lambda: make_vec_env(name, n, seed=0),
        "ngrl make_vec_env (async)": lambda: make_vec_env(name, n, seed=0, vectorization="async"),
        "SB3 make_vec_env + DummyVecEnv": lambda: sb3_make_vec_env(
            gym_id, n, seed=0, vec_env_cls=DummyVecEnv
        ),
        "SB3 make_vec_env + SubprocVecEnv": lambda: sb3_make_vec_env(
            gym_id, n, seed=0, vec_env_cls=SubprocVecEnv
        ),
        "gymnasium AsyncVectorEnv": lambda: GymnasiumStepper(
            gym.make_vec(gym_id, n, vectorization_mode="async")
        ),
    }


def raw_emulator() -> Callable[[], VecEnv]:
    from ngrl.envs.atari import AtariVecEnv, ale_vector_env

    return lambda: AtariVecEnv(ale_vector_env("breakout", 1, num_threads=1), [0])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per row (median)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    workloads: dict[str, dict[str, Callable[[], VecEnv | GymnasiumStepper]]] = {
        "Breakout, 1 env, 1 thread": {"raw emulator (ale-py, one thread)": raw_emulator()},
        "Breakout, 8 envs": atari_rows(8),
        "Breakout, 16 envs": atari_rows(16),
        "HalfCheetah, 8 envs": gym_rows("HalfCheetah", "HalfCheetah-v5", 8),
        "CartPole, 16 envs": gym_rows("CartPole", "CartPole-v1", 16),
    }
    print(f"machine: {os.cpu_count()} cores, no GPU\n")
    results: dict[str, dict[str, float]] = {}
    for workload, rows in workloads.items():
        results[workload] = {}
        for label, build in rows.items():
            results[workload][label] = steps_per_second(build(), args.seconds, args.repeats)
        sb3 = [v for k, v in results[workload].items() if k.startswith("SB3")]
        best = max(sb3) if sb3 else None
        print(f"### {workload}\n\n| vector env | steps/s | ÷ best SB3 |\n|---|---:|---:|")
        for label, rate in results[workload].items():
            ratio = f"{rate / best:.2f}" if best else "—"
            print(f"| {label} | {rate:,.0f} | {ratio} |")
        print(flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
