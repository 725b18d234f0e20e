"""The CUDA paths (``-m gpu``; run by scripts/check_gpu.sh on a machine with a GPU).

A K-FAC step on CUDA equals the CPU step in float64; every curvature and VI optimizer
steps on CUDA; statistics keep float32 under bf16 autocast on CUDA; the CLI trains ACKTR
with ``--device cuda``, alone and under torchrun (NCCL when there are two GPUs).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ngrl import fisher_loss
from ngrl.agents import ACKTR
from ngrl.bayes import SLANG, VOGN, NoisyAdam, NoisyKFAC
from ngrl.curvature import available
from ngrl.optim import KFAC
from ngrl.train import main

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
VARIATIONAL = {
    "vogn": VOGN,
    "noisy-adam": NoisyAdam,
    "slang": lambda model, n, **kw: SLANG(model, n, rank=3, **kw),
    "noisy-kfac": lambda model, n, **kw: NoisyKFAC(model, n, factor_update_steps=1, **kw),
}


def mlp(device: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).to(device, dtype)


def kfac_steps(model: nn.Module, opt: KFAC, steps: int, device: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 6, generator=generator, dtype=dtype).to(device)
        y = torch.randint(0, 4, (32,), generator=generator).to(device)
        noise = torch.randn(32, 4, generator=generator, dtype=dtype).to(device)
        out = model(x)
        with opt.capture():  # a Gaussian Fisher draw made on the CPU: the same on both devices
            (0.5 * (out - (out.detach() + noise)).square().sum(1).mean()).backward(
                retain_graph=True
            )
        opt.zero_grad()
        F.cross_entropy(out, y).backward()
        opt.step()


@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "shampoo"])
def test_a_kfac_step_on_cuda_equals_the_cpu_step_in_float64(curvature: str) -> None:
    params = []
    for device in ("cpu", "cuda"):
        model = mlp(device, torch.float64)
        opt = KFAC(model, lr=0.1, curvature=curvature, inv_update_steps=2)
        kfac_steps(model, opt, 4, device, torch.float64)
        params.append(torch.cat([p.detach().cpu().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(params[1], params[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("optimizer", [*available(), *VARIATIONAL])
def test_every_optimizer_steps_on_cuda(optimizer: str) -> None:
    model = mlp("cuda")
    before = [p.detach().clone() for p in model.parameters()]
    if optimizer in VARIATIONAL:
        opt = VARIATIONAL[optimizer](model, 100)
        x, y = torch.randn(32, 6, device="cuda"), torch.randint(0, 4, (32,), device="cuda")
        for _ in range(3):
            with opt.sampled_params(train=True):
                F.cross_entropy(model(x), y).backward()
            opt.step()
    else:
        kfac_steps(
            model, KFAC(model, curvature=optimizer, inv_update_steps=2), 3, "cuda", torch.float32
        )
    after = list(model.parameters())
    assert all(p.is_cuda and torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(p, q) for p, q in zip(after, before, strict=True))


def test_statistics_stay_float32_under_bf16_autocast_on_cuda() -> None:
    model = mlp("cuda")
    opt = KFAC(model)
    x = torch.randn(32, 6, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
        with opt.capture():
            fisher_loss(out.float(), "categorical").backward(retain_graph=True)
    opt.zero_grad()
    F.cross_entropy(model(x), torch.zeros(32, dtype=torch.long, device="cuda")).backward()
    opt.step()
    assert all(b.a_factor.dtype == torch.float32 for b in opt.blocks.values())


def test_acktr_trains_through_the_cli_on_cuda(tmp_path: Path) -> None:
    assert (
        main(
            [
                "acktr",
                "--env",
                "CartPole",
                "--device",
                "cuda",
                "--timesteps",
                "4000",
                "--no-progress",
                "--eval-episodes",
                "2",
                "--log-dir",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    model = ACKTR.load(tmp_path / "run" / "checkpoint.zip", device="cuda")
    assert model.num_timesteps >= 4000 and next(model.policy.parameters()).is_cuda


def test_torchrun_on_cuda(tmp_path: Path) -> None:
    """One rank per GPU (NCCL needs a GPU for each): two ranks over NCCL when there are
    two GPUs, otherwise one rank under torchrun."""
    ranks = 2 if torch.cuda.device_count() >= 2 else 1
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(ranks),
            "-m",
            "ngrl.train",
            "acktr",
            "--env",
            "CartPole",
            "--device",
            "cuda",
            "--n-envs",
            "4",
            "--timesteps",
            "1280",
            "--no-progress",
            "--eval-episodes",
            "0",
            "--log-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert ACKTR.load(tmp_path / "run" / "checkpoint.zip").num_timesteps >= 1280
