"""The speed options of K-FAC, each against its exact definition: factored damping,
K-FAC-reduce for weight sharing, statistics-only backward, statistics subsampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ngrl.fisher import layer_indices
from ngrl.layers import Conv2dLayer
from ngrl.optim import KFAC
from tests.helpers.oracle import (
    capture_batch,
    damped_solve,
    flat_parameters,
    layer_gradient,
    oracle_block,
    sample_classes,
)

pytestmark = pytest.mark.usefixtures("float64")

CONV_SHAPES = [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, dilation=2, padding=2),
    dict(kernel_size=3, padding="same", padding_mode="reflect"),
    dict(kernel_size=3, padding=1, padding_mode="circular", bias=False),
    dict(kernel_size=(2, 3), stride=(1, 2)),
    dict(kernel_size=8, stride=4),
]


def test_factored_damping_step_solves_the_damped_kronecker_product() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(12, 4)
    lr, damping = 0.2, 1e-2
    opt = KFAC(
        model,
        lr=lr,
        damping=damping,
        kl_clip=None,
        momentum=0.0,
        curvature_options={"damping_rule": "factored"},
    )
    capture_batch(opt, model, x, sample_classes(model(x)))
    F.cross_entropy(model(x), torch.randint(0, 3, (12,))).backward()
    expected = {}
    for name in ("0", "2"):
        block = opt.blocks[name]
        a, g = block.a_factor, block.g_factor
        pi = ((a.trace() / a.shape[0]) / (g.trace() / g.shape[0])) ** 0.5
        a_damped = a + pi * damping**0.5 * torch.eye(a.shape[0])
        g_damped = g + damping**0.5 / pi * torch.eye(g.shape[0])
        dense = torch.kron(g_damped, a_damped)
        expected[name] = -lr * torch.linalg.solve(dense, layer_gradient(model, name))
    before = flat_parameters(model)
    opt.step()
    delta = flat_parameters(model) - before
    for name in expected:
        torch.testing.assert_close(delta[layer_indices(model, name)], expected[name])


def test_bad_curvature_options_name_the_argument() -> None:
    with pytest.raises(ValueError, match="damping_rule"):
        KFAC(nn.Linear(2, 2), curvature_options={"damping_rule": "pi"})
    with pytest.raises(ValueError, match="Invalid curvature_options"):
        KFAC(nn.Linear(2, 2), curvature_options={"dampnig_rule": "exact"})
    with pytest.raises(ValueError, match="Invalid weight_sharing"):
        KFAC(nn.Linear(2, 2), weight_sharing="mean")  # type: ignore[arg-type]


@pytest.mark.parametrize("options", CONV_SHAPES)
def test_reduce_patch_means_equal_the_unfolded_patch_means(options: dict) -> None:
    layer = Conv2dLayer("conv", nn.Conv2d(2, 3, **options))
    x = torch.randn(3, 2, 11, 10)
    torch.testing.assert_close(layer.patch_means(x), layer.patches(x).mean(1))


def test_reduce_factors_follow_the_kfac_reduce_formulas() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(75, 2))
    x = torch.randn(5, 2, 5, 5)
    targets = sample_classes(model(x))
    s = model[0](x)
    s.retain_grad()
    F.cross_entropy(model[1:](s), targets).backward()
    model.zero_grad()
    a = torch.cat([F.unfold(x, 3, padding=1).mean(2), torch.ones(5, 1)], 1)
    g = (s.grad * 5).sum((2, 3))
    opt = KFAC(model, weight_sharing="reduce")
    capture_batch(opt, model, x, targets)
    torch.testing.assert_close(opt.blocks["0"].a_factor, a.T @ a / 5)
    torch.testing.assert_close(opt.blocks["0"].g_factor, g.T @ g / 5)


def test_reduce_is_exact_when_the_positions_are_pooled_right_after_the_layer() -> None:
    """Eschenhagen et al. 2023: K-FAC-reduce is exact in the reduce setting (batch of 1)."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(1, 2, 6, 6)
    targets = sample_classes(model(x))
    opt = KFAC(model, weight_sharing="reduce")
    capture_batch(opt, model, x, targets)
    exact = oracle_block(model, x, targets, "0")
    torch.testing.assert_close(opt.blocks["0"].to_dense(), exact, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("inplace", [False, True])
def test_capture_backward_gives_the_same_statistics_without_touching_grads(
    inplace: bool,
) -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(2, 3, 3),
            nn.ReLU(inplace=inplace),
            nn.Flatten(),
            nn.Linear(27, 4),
            nn.LayerNorm(4),
            nn.Linear(4, 3),
        )

    x = torch.randn(6, 2, 5, 5)
    reference, fast = build(), build()
    ref_opt, fast_opt = KFAC(reference), KFAC(fast)
    targets = sample_classes(reference(x))
    with ref_opt.capture():
        F.cross_entropy(reference(x), targets).backward()
    fast_opt.capture_backward(F.cross_entropy(fast(x), targets), retain_graph=False)
    for name, block in ref_opt.blocks.items():
        torch.testing.assert_close(fast_opt.blocks[name].to_dense(), block.to_dense())
    if not inplace:
        assert all(p.grad is None for p in fast.parameters())


def test_stats_batch_size_takes_the_first_examples() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(10, 3)
    targets = sample_classes(model(x))
    sub = KFAC(model, stats_batch_size=4)
    capture_batch(sub, model, x, targets)
    full_model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    full_model.load_state_dict(model.state_dict())
    full = KFAC(full_model)
    # The mean loss over 10 examples, restricted to the first 4, is the mean over those 4
    # scaled by 4/10; statistics are per example, so the subsample's factors must equal
    # the factors of the first four examples alone.
    capture_batch(full, full_model, x[:4], targets[:4])
    for name in ("0", "2"):
        torch.testing.assert_close(sub.blocks[name].a_factor, full.blocks[name].a_factor)
        torch.testing.assert_close(sub.blocks[name].g_factor, full.blocks[name].g_factor)


def test_diag_curvature_step_is_the_damped_solve_with_the_exact_diagonal() -> None:
    model = nn.Linear(3, 2)
    x = torch.randn(1, 3).expand(6, 3).contiguous()
    targets = sample_classes(model(x))
    opt = KFAC(model, curvature="diag", lr=0.1, damping=1e-2, kl_clip=None, momentum=0.0)
    capture_batch(opt, model, x, targets)
    diag = torch.diag(oracle_block(model, x, targets, "").diagonal())
    F.cross_entropy(model(x), torch.tensor([0, 1, 0, 1, 0, 1])).backward()
    grad = layer_gradient(model, "")
    before = flat_parameters(model)[layer_indices(model, "")]
    opt.step()
    after = flat_parameters(model)[layer_indices(model, "")]
    torch.testing.assert_close(after - before, -0.1 * damped_solve(diag, grad, 1e-2))


def test_unbatched_inputs_count_as_one_example() -> None:
    batched, single = nn.Linear(3, 2), nn.Linear(3, 2)
    single.load_state_dict(batched.state_dict())
    x = torch.randn(3)
    opts = KFAC(batched), KFAC(single)
    with opts[0].capture():
        batched(x[None]).square().sum().backward()
    with opts[1].capture():
        single(x).square().sum().backward()
    torch.testing.assert_close(opts[1].blocks[""].to_dense(), opts[0].blocks[""].to_dense())


def test_capture_backward_ignores_layers_that_did_not_run() -> None:
    model = nn.ModuleDict({"body": nn.Linear(3, 4), "unused": nn.Linear(4, 2)})
    opt = KFAC(model)
    out = model["body"](torch.randn(5, 3))
    opt.capture_backward(out.square().sum(1).mean())
    assert opt.blocks["body"].initialized and not opt.blocks["unused"].initialized
    assert all(p.grad is None for p in model.parameters())  # the fast path was taken
