"""K-FAC for 1-D and 3-D convolutions: the same KFC conventions as 2-D, checked the same
ways (the patches rebuild the layer's output; with one position and one shared input the
block is the exact Fisher block; K-FAC-reduce's means equal the patches' means)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ngrl.capture import ConvLayer, find_layers
from ngrl.optim import KFAC
from tests.helpers.oracle import capture_batch, oracle_block, sample_classes

CONVS = {
    "conv1d": (nn.Conv1d, (9,)),
    "conv3d": (nn.Conv3d, (5, 6, 4)),
}
OPTIONS = [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=2, dilation=2, padding=1, bias=False),
    dict(kernel_size=3, padding="same", padding_mode="reflect"),
    dict(kernel_size=3, padding=1, padding_mode="circular"),
]


@pytest.mark.parametrize("kind", CONVS)
@pytest.mark.parametrize("options", OPTIONS)
def test_patches_rebuild_the_convolution_and_their_means_are_the_reduce_statistics(
    kind: str, options: dict
) -> None:
    cls, spatial = CONVS[kind]
    conv = cls(2, 4, **options)
    (layer,) = find_layers(conv)
    assert isinstance(layer, ConvLayer) and layer.kronecker
    x = torch.randn(3, 2, *spatial)
    output = conv(x)
    a, _ = layer.statistics(x, output)
    weight = layer.gather([p.detach() for p in layer.params])
    rebuilt = (a @ weight.T).transpose(1, 2).reshape(output.shape)
    torch.testing.assert_close(rebuilt, output.detach())
    torch.testing.assert_close(layer.patch_means(x), layer.patches(x).mean(1))


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("kind", CONVS)
def test_one_position_and_a_shared_input_give_the_exact_fisher_block(kind: str) -> None:
    cls, spatial = CONVS[kind]
    kernel = tuple(min(3, s) for s in spatial)
    model = nn.Sequential(cls(2, 3, kernel), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(1, 2, *kernel).expand(6, 2, *kernel).contiguous()
    model(x)  # materialise the lazy layer
    targets = sample_classes(model(x))
    opt = KFAC(model, curvature="kfac")
    capture_batch(opt, model, x, targets)
    torch.testing.assert_close(
        opt.blocks["0"].to_dense(), oracle_block(model, x, targets, "0"), rtol=1e-10, atol=1e-12
    )


def test_grouped_convolutions_fall_back_to_a_diagonal_block() -> None:
    (layer,) = find_layers(nn.Conv1d(4, 4, 3, groups=2))
    assert not layer.kronecker
