"""K-FAC against the exact Fisher (ngrl.fisher), in float64 on models of a few hundred
parameters: factors, dense blocks, and the parameter update itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ngrl.fisher import exact_fisher, layer_indices
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


def plain_kfac(model: nn.Module, **kwargs: object) -> KFAC:
    """K-FAC reduced to ``θ ← θ − lr·(F̂ + λI)⁻¹∇`` (no trust region, momentum or decay)."""
    options: dict[str, object] = dict(lr=0.3, damping=1e-3, kl_clip=None, momentum=0.0)
    options.update(kwargs)
    return KFAC(model, **options)  # type: ignore[arg-type]


def test_linear_with_shared_input_equals_exact_fisher_block() -> None:
    model = nn.Linear(5, 3)
    x = torch.randn(1, 5).expand(8, 5).contiguous()
    targets = sample_classes(model(x))
    opt = plain_kfac(model)
    capture_batch(opt, model, x, targets)

    exact = oracle_block(model, x, targets, "")
    torch.testing.assert_close(opt.blocks[""].to_dense(), exact, rtol=1e-10, atol=1e-12)


def test_linear_with_shared_input_matches_true_fisher_in_expectation() -> None:
    model = nn.Linear(4, 3)
    x = torch.randn(1, 4).expand(20000, 4).contiguous()
    opt = plain_kfac(model)
    capture_batch(opt, model, x, sample_classes(model(x)))

    true_fisher = exact_fisher(model, x[:1], "categorical")[layer_indices(model, "")]
    true_fisher = true_fisher[:, layer_indices(model, "")]
    error = (opt.blocks[""].to_dense() - true_fisher).norm() / true_fisher.norm()
    assert error < 0.05  # Monte-Carlo error with 20000 sampled targets


def test_one_step_is_the_damped_natural_gradient() -> None:
    model = nn.Linear(5, 3)
    x = torch.randn(1, 5).expand(8, 5).contiguous()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    targets = sample_classes(model(x))
    opt = plain_kfac(model, lr=0.3, damping=1e-3)
    capture_batch(opt, model, x, targets)
    exact = oracle_block(model, x, targets, "")

    F.cross_entropy(model(x), labels).backward()
    grad = layer_gradient(model, "")
    before = flat_parameters(model)[layer_indices(model, "")]
    opt.step()
    after = flat_parameters(model)[layer_indices(model, "")]

    expected = -0.3 * damped_solve(exact, grad, 1e-3)
    torch.testing.assert_close(after - before, expected, rtol=1e-8, atol=1e-12)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def hand_factors(model: nn.Sequential, x: torch.Tensor, targets: torch.Tensor) -> list:
    """A and G of both layers computed directly from the definitions."""
    first, second = model[0], model[2]
    s1 = first(x)
    s1.retain_grad()
    h = torch.tanh(s1)
    s2 = second(h)
    s2.retain_grad()
    F.cross_entropy(s2, targets).backward()
    model.zero_grad()
    n = x.shape[0]
    factors = []
    for a, s in ((x, s1), (h, s2)):
        a_hat = torch.cat([a, torch.ones(n, 1)], 1).detach()
        g = s.grad * n  # per-example gradients of the mean loss
        factors.append((a_hat.T @ a_hat / n, g.T @ g / n))
    return factors


def test_mlp_blocks_are_kron_of_hand_computed_factors() -> None:
    model = mlp()
    x = torch.randn(10, 4)
    targets = sample_classes(model(x))
    (a1, g1), (a2, g2) = hand_factors(model, x, targets)
    opt = plain_kfac(model)
    capture_batch(opt, model, x, targets)

    for name, (a, g) in (("0", (a1, g1)), ("2", (a2, g2))):
        block = opt.blocks[name]
        torch.testing.assert_close(block.a_factor, a)
        torch.testing.assert_close(block.g_factor, g)
        torch.testing.assert_close(block.to_dense(), torch.kron(g, a))


def test_mlp_step_is_the_per_layer_damped_solve() -> None:
    model = mlp()
    x = torch.randn(10, 4)
    labels = torch.randint(0, 3, (10,))
    targets = sample_classes(model(x))
    opt = plain_kfac(model, lr=0.5, damping=1e-2)
    capture_batch(opt, model, x, targets)
    blocks = {name: opt.blocks[name].to_dense() for name in ("0", "2")}

    F.cross_entropy(model(x), labels).backward()
    grads = {name: layer_gradient(model, name) for name in blocks}
    before = flat_parameters(model)
    opt.step()
    delta = flat_parameters(model) - before

    for name, block in blocks.items():
        expected = -0.5 * damped_solve(block, grads[name], 1e-2)
        torch.testing.assert_close(delta[layer_indices(model, name)], expected)


def test_factors_blend_with_factor_decay() -> None:
    model = mlp()
    x1, x2 = torch.randn(6, 4), torch.randn(6, 4)
    t1, t2 = sample_classes(model(x1), 1), sample_classes(model(x2), 2)
    (a1, g1), _ = hand_factors(model, x1, t1)
    (a2, g2), _ = hand_factors(model, x2, t2)
    opt = plain_kfac(model, factor_decay=0.8)
    capture_batch(opt, model, x1, t1)
    capture_batch(opt, model, x2, t2)

    torch.testing.assert_close(opt.blocks["0"].a_factor, 0.8 * a1 + 0.2 * a2)
    torch.testing.assert_close(opt.blocks["0"].g_factor, 0.8 * g1 + 0.2 * g2)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_reduction_gives_per_example_statistics(reduction: str) -> None:
    model = mlp()
    x = torch.randn(7, 4)
    targets = sample_classes(model(x))
    opt = plain_kfac(model, loss_reduction=reduction)
    with opt.capture():
        F.cross_entropy(model(x), targets, reduction=reduction).backward()

    (_, g1), _ = hand_factors(model, x, targets)
    torch.testing.assert_close(opt.blocks["0"].g_factor, g1)


def conv_model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(75, 2))


def test_conv_factors_match_unfold_kfc_formulas() -> None:
    model = conv_model()
    x = torch.randn(4, 2, 5, 5)
    targets = sample_classes(model(x))
    conv = model[0]
    s = conv(x)
    s.retain_grad()
    F.cross_entropy(model[1:](s), targets).backward()
    model.zero_grad()

    n, positions = x.shape[0], 25
    patches = F.unfold(x, 3, padding=1).transpose(1, 2)  # (N, T, C·k·k)
    a_hat = torch.cat([patches, torch.ones(n, positions, 1)], 2).reshape(-1, 19)
    g = (s.grad * n).flatten(2).transpose(1, 2).reshape(-1, 3)
    expected_a = a_hat.T @ a_hat / n  # A = E_n[Σ_t ā ā^T]
    expected_g = g.T @ g / (n * positions)  # G = E_n[(1/T) Σ_t g g^T]

    opt = plain_kfac(model)
    capture_batch(opt, model, x, targets)
    torch.testing.assert_close(opt.blocks["0"].a_factor, expected_a)
    torch.testing.assert_close(opt.blocks["0"].g_factor, expected_g)


def test_conv_with_one_position_and_shared_input_equals_exact_fisher_block() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten())
    x = torch.randn(1, 2, 3, 3).expand(6, 2, 3, 3).contiguous()
    targets = sample_classes(model(x))
    opt = plain_kfac(model)
    capture_batch(opt, model, x, targets)

    exact = oracle_block(model, x, targets, "0")
    torch.testing.assert_close(opt.blocks["0"].to_dense(), exact, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "options",
    [
        dict(stride=2, padding=1),
        dict(dilation=2, padding=2),
        dict(padding="same", padding_mode="reflect"),
        dict(padding=1, padding_mode="circular", bias=False),
        dict(kernel_size=(2, 3), stride=(1, 2)),
    ],
)
def test_conv_patches_reproduce_the_convolution(options: dict) -> None:
    """The patches K-FAC uses are right iff ``[W | b] @ ā_t`` is the layer's output."""
    kwargs = dict(kernel_size=3)
    kwargs.update(options)
    conv = nn.Conv2d(2, 4, **kwargs)
    layer = Conv2dLayer("conv", conv)
    x = torch.randn(3, 2, 7, 6)
    output = conv(x)
    a, _ = layer.statistics(x, output)
    weight = layer.gather([p.detach() for p in layer.params])
    rebuilt = (a @ weight.T).transpose(1, 2).reshape(output.shape)
    torch.testing.assert_close(rebuilt, output.detach())


def test_linear_on_sequences_counts_positions_like_kfc() -> None:
    layer = nn.Linear(3, 2)
    opt = plain_kfac(layer)
    x = torch.randn(4, 5, 3)
    with opt.capture():
        (layer(x).square().sum(-1).mean()).backward()
    a_hat = torch.cat([x, torch.ones(4, 5, 1)], 2).reshape(-1, 4)
    torch.testing.assert_close(opt.blocks[""].a_factor, a_hat.T @ a_hat / 4)


@pytest.mark.parametrize("kl_clip", [1e-6, 1e-4])
def test_trust_region_clips_the_quadratic_kl_to_kl_clip(kl_clip: float) -> None:
    model = mlp()
    x = torch.randn(10, 4)
    lr = 0.5
    opt = plain_kfac(model, lr=lr, damping=1e-2, kl_clip=kl_clip)
    capture_batch(opt, model, x, sample_classes(model(x)))
    blocks = {name: opt.blocks[name].to_dense() for name in ("0", "2")}
    F.cross_entropy(model(x), torch.randint(0, 3, (10,))).backward()
    grads = {name: layer_gradient(model, name) for name in blocks}
    natural = {name: damped_solve(blocks[name], grads[name], 1e-2) for name in blocks}
    quadratic = sum(float(natural[n] @ grads[n]) for n in blocks)

    before = flat_parameters(model)
    opt.step()
    delta = flat_parameters(model) - before
    nu = min(1.0, (kl_clip / (lr**2 * quadratic)) ** 0.5)
    assert nu < 1.0
    for name in blocks:
        torch.testing.assert_close(delta[layer_indices(model, name)], -lr * nu * natural[name])
    assert lr**2 * nu**2 * quadratic == pytest.approx(kl_clip, rel=1e-10)


def test_trust_region_inactive_when_kl_clip_is_large() -> None:
    model = mlp()
    x = torch.randn(10, 4)
    opt = plain_kfac(model, lr=1e-3, damping=1e-2, kl_clip=1e3)
    capture_batch(opt, model, x, sample_classes(model(x)))
    block = opt.blocks["2"].to_dense()
    F.cross_entropy(model(x), torch.randint(0, 3, (10,))).backward()
    grad = layer_gradient(model, "2")
    before = flat_parameters(model)
    opt.step()
    delta = (flat_parameters(model) - before)[layer_indices(model, "2")]
    torch.testing.assert_close(delta, -1e-3 * damped_solve(block, grad, 1e-2))


def test_momentum_and_weight_decay_follow_sgd_on_the_clipped_direction() -> None:
    model = nn.Linear(3, 2)
    x = torch.randn(1, 3).expand(5, 3).contiguous()
    opt = plain_kfac(model, lr=0.1, damping=1e-2, momentum=0.9, weight_decay=0.01)
    capture_batch(opt, model, x, sample_classes(model(x)))
    block = opt.blocks[""].to_dense()
    idx = layer_indices(model, "")
    buffer = torch.zeros(idx.numel())
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), torch.tensor([0, 1, 0, 1, 1])).backward()
        params = flat_parameters(model)[idx]
        d = damped_solve(block, layer_gradient(model, ""), 1e-2) + 0.01 * params
        buffer = 0.9 * buffer + d
        opt.step()
        torch.testing.assert_close(flat_parameters(model)[idx], params - 0.1 * buffer)


def test_dampened_momentum_is_tf_momentum_optimizer_on_the_preconditioned_direction() -> None:
    """ACKTR's update (``dampening == momentum``) is baselines' TF ``MomentumOptimizer(lr·(1−μ),
    μ)`` fed with ``(F̂+λI)⁻¹∇``: ``acc ← μ·acc + d`` from ``acc = 0``, ``θ ← θ − lr(1−μ)·acc``,
    so the first step is ``lr(1−μ)·d`` (torch's SGD would start at ``lr·d``)."""
    model = nn.Linear(3, 2)
    x = torch.randn(1, 3).expand(5, 3).contiguous()
    lr, mu = 0.1, 0.9
    opt = plain_kfac(model, lr=lr, damping=1e-2, momentum=mu, dampening=mu)
    capture_batch(opt, model, x, sample_classes(model(x)))
    block = opt.blocks[""].to_dense()
    target = torch.tensor([0, 1, 0, 1, 1])
    idx = layer_indices(model, "")
    accumulator = torch.zeros(8)
    for _ in range(3):
        model.zero_grad()
        F.cross_entropy(model(x), target).backward()
        before = flat_parameters(model)[idx]
        accumulator = mu * accumulator + damped_solve(block, layer_gradient(model, ""), 1e-2)
        opt.step()
        torch.testing.assert_close(
            flat_parameters(model)[idx], before - lr * (1 - mu) * accumulator
        )
