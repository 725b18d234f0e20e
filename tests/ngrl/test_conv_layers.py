"""K-FAC for 1-D and 3-D convolutions and for transposed convolutions: the same KFC
conventions as 2-D, checked the same ways (the patches rebuild the layer's output; with one
position and one shared input the block is the exact Fisher block; K-FAC-reduce's means
equal the patches' means)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ngrl.layers import ConvLayer, ConvTransposeLayer, find_layers
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


TRANSPOSED = {
    "transposed1d": (nn.ConvTranspose1d, (5,)),
    "transposed2d": (nn.ConvTranspose2d, (4, 5)),
    "transposed3d": (nn.ConvTranspose3d, (3, 4, 2)),
}
TRANSPOSED_OPTIONS = [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1, output_padding=1),
    dict(kernel_size=2, dilation=2, padding=1, bias=False),
    dict(kernel_size=2, stride=3, padding=2),  # more padding than the kernel: crops
]
CASES = [(kind, options) for kind in CONVS for options in OPTIONS] + [
    (kind, options) for kind in TRANSPOSED for options in TRANSPOSED_OPTIONS
]


@pytest.mark.parametrize(("kind", "options"), CASES)
def test_patches_rebuild_the_convolution_and_their_means_are_the_reduce_statistics(
    kind: str, options: dict
) -> None:
    cls, spatial = {**CONVS, **TRANSPOSED}[kind]
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


@pytest.mark.parametrize("kind", TRANSPOSED)
def test_a_transposed_block_view_scatters_back_to_the_parameters(kind: str) -> None:
    cls, _ = TRANSPOSED[kind]
    conv = cls(2, 3, kernel_size=2, stride=2)
    (layer,) = find_layers(conv)
    assert isinstance(layer, ConvTransposeLayer) and layer.shape == (3, 2 * 2 ** len(_) + 1)
    params = [p.detach() for p in layer.params]
    for part, param in zip(layer.scatter(layer.gather(params)), params, strict=True):
        torch.testing.assert_close(part, param, rtol=0, atol=0)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("kind", TRANSPOSED)
def test_one_transposed_position_and_a_shared_input_give_the_exact_fisher_block(
    kind: str,
) -> None:
    cls, spatial = TRANSPOSED[kind]
    ones = (1,) * len(spatial)
    model = nn.Sequential(cls(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3, 4))
    x = torch.randn(1, 2, *ones).expand(6, 2, *ones).contiguous()
    assert model[0](x).shape[2:] == ones  # one output position
    targets = sample_classes(model(x))
    opt = KFAC(model, curvature="kfac")
    capture_batch(opt, model, x, targets)
    torch.testing.assert_close(
        opt.blocks["0"].to_dense(), oracle_block(model, x, targets, "0"), rtol=1e-10, atol=1e-12
    )


def test_a_transposed_output_size_other_than_the_layers_own_is_refused() -> None:
    conv = nn.ConvTranspose1d(2, 3, 3, stride=2)
    opt = KFAC(conv)
    x = torch.randn(4, 2, 5)
    with pytest.raises(ValueError, match="output_size="), opt.capture():
        conv(x, output_size=[12]).sum().backward()
