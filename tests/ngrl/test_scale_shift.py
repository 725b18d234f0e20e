"""The affine part of normalisation layers (kfac-jax's scale-and-shift blocks) against the
exact Fisher block: ``"full"`` is it, ``"diagonal"`` is its diagonal (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ngrl.curvature import DenseBlock, DiagonalBlock
from ngrl.layers import ScaleShiftLayer, find_layers
from ngrl.optim import KFAC
from tests.helpers.oracle import capture_batch, layer_gradient, oracle_block, sample_classes

DAMPING = 0.1


def layer_norm_model() -> nn.Module:  # on sequences: γ and β shared by 5 positions
    return nn.Sequential(
        nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3)
    )


def group_norm_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(36, 3)
    )


def batch_norm_model() -> nn.Module:  # evaluation mode: the running statistics
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3)
    )
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


MODELS = {
    "layernorm": (layer_norm_model, (5, 3)),
    "groupnorm": (group_norm_model, (2, 5, 5)),
    "batchnorm-eval": (batch_norm_model, (2, 7)),
}


def setup(kind: str, scale_shift: str) -> tuple[nn.Module, KFAC, torch.Tensor, torch.Tensor]:
    make, shape = MODELS[kind]
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    x = torch.randn(7, *shape)
    targets = sample_classes(model(x))
    opt = KFAC(model, curvature="kfac", scale_shift=scale_shift, kl_clip=None, momentum=0.0)
    capture_batch(opt, model, x, targets)
    return model, opt, x, targets


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("kind", MODELS)
def test_the_full_block_is_the_exact_fisher_block(kind: str) -> None:
    model, opt, x, targets = setup(kind, "full")
    (layer,) = [layer for layer in find_layers(model) if isinstance(layer, ScaleShiftLayer)]
    block = opt.blocks[layer.name]
    assert isinstance(block, DenseBlock) and block.shape == (8,)
    exact = oracle_block(model, x, targets, layer.name)
    torch.testing.assert_close(block.to_dense(), exact, rtol=1e-10, atol=1e-12)
    # The step of the block is the exact damped natural gradient of the layer.
    torch.nn.functional.cross_entropy(model(x), targets).backward()
    grad = layer_gradient(model, layer.name)
    expected = torch.linalg.solve(exact + DAMPING * torch.eye(8), grad)
    torch.testing.assert_close(block.precondition(grad, DAMPING), expected, rtol=1e-8, atol=1e-12)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("kind", MODELS)
def test_the_diagonal_block_is_the_exact_fisher_diagonal(kind: str) -> None:
    model, opt, x, targets = setup(kind, "diagonal")
    block = opt.blocks["1"]
    assert isinstance(block, DiagonalBlock)
    exact = oracle_block(model, x, targets, "1")
    torch.testing.assert_close(block.to_dense(), torch.diag(exact.diagonal()), rtol=1e-10, atol=0)


def test_a_layer_norm_without_bias_and_a_bad_choice() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4, bias=False), nn.Linear(4, 2))
    opt = KFAC(model)
    assert opt.blocks["1"].shape == (4,)
    x = torch.randn(6, 3)
    capture_batch(opt, model, x, sample_classes(model(x)))
    assert opt.blocks["1"].initialized
    with pytest.raises(ValueError, match="Invalid scale_shift"):
        KFAC(model, scale_shift="kronecker")  # type: ignore[arg-type]
