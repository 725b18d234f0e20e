"""End to end: K-FAC trains, and where curvature matters it beats a tuned SGD."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ngrl import KFAC, fisher_loss


def ill_conditioned_regression() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(-2, 1, 8)  # feature scales 0.01 … 10: condition number 1e6
    x = torch.randn(256, 8, generator=generator) * scales
    y = x @ torch.randn(8, 1, generator=generator) + 0.5
    return x, y


def test_kfac_solves_an_ill_conditioned_regression_that_sgd_cannot() -> None:
    """For a linear model with a Gaussian likelihood the K-FAC block is the exact Fisher,
    which is the Hessian of the squared error: a damped Newton step. SGD's stable step is
    bounded by the largest curvature and crawls along the smallest."""
    x, y = ill_conditioned_regression()
    losses = {}
    for name in ("kfac", "sgd"):
        torch.manual_seed(0)
        model = nn.Linear(8, 1)
        if name == "kfac":
            opt = KFAC(model, lr=1.0, damping=1e-8, kl_clip=None, momentum=0.0)
        else:  # 1.9 / largest Hessian eigenvalue: the fastest stable SGD step
            hessian = torch.cat([x, torch.ones(256, 1)], 1)
            top = torch.linalg.eigvalsh(2 * hessian.T @ hessian / 256)[-1]
            opt = torch.optim.SGD(model.parameters(), lr=float(1.9 / top))
        for _ in range(20):
            out = model(x)
            if isinstance(opt, KFAC):
                opt.capture_backward(fisher_loss(out, kind="gaussian"))
            opt.zero_grad()
            loss = 0.5 * F.mse_loss(out, y, reduction="none").sum(1).mean()
            loss.backward()
            opt.step()
        with torch.no_grad():
            losses[name] = float(0.5 * F.mse_loss(model(x), y, reduction="none").sum(1).mean())
    assert losses["kfac"] < 1e-6
    assert losses["sgd"] > 1e3 * losses["kfac"]


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(
            weight_sharing="reduce",
            stats_batch_size=16,
            curvature_options={"damping_rule": "factored"},
            factor_update_steps=2,
        ),
    ],
    ids=["defaults", "fast-options"],
)
def test_kfac_trains_a_small_convnet(options: dict) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=generator)
    y = (x[:, 0, :4].sum((1, 2)) > x[:, 0, 4:].sum((1, 2))).long()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(72, 16),
        nn.LayerNorm(16),
        nn.Tanh(),
        nn.Linear(16, 2),
    )
    opt = KFAC(model, lr=0.1, damping=1e-2, kl_clip=1e-2, **options)
    first = None
    for _ in range(40):
        out = model(x)
        if opt.capture_due:
            opt.capture_backward(fisher_loss(out, kind="categorical"))
        opt.zero_grad()
        loss = F.cross_entropy(out, y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    with torch.no_grad():
        final = float(F.cross_entropy(model(x), y))
    assert final < 0.5 * first
