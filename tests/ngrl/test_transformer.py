"""K-FAC on a tiny transformer: dense layers shared by the positions of a sequence
(K-FAC-expand and K-FAC-reduce, Eschenhagen et al. 2023), with embeddings and layer norms,
checked against the formulas from per-position quantities and trained without a fallback."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngrl.layers import EmbeddingLayer, LinearLayer, ScaleShiftLayer, find_layers
from ngrl.optim import KFAC, CurvatureFallbackWarning
from tests.helpers.oracle import capture_batch, fit, sample_classes, shared_layer_factors

VOCAB, WIDTH, LENGTH, CLASSES = 11, 8, 6, 4


class TinyTransformer(nn.Module):
    """One pre-norm transformer block (single-head attention, an MLP) over token and
    position embeddings, mean-pooled into class logits."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, WIDTH)
        self.positions = nn.Embedding(LENGTH, WIDTH)
        self.norm1 = nn.LayerNorm(WIDTH)
        self.query = nn.Linear(WIDTH, WIDTH)
        self.key = nn.Linear(WIDTH, WIDTH)
        self.value = nn.Linear(WIDTH, WIDTH)
        self.out = nn.Linear(WIDTH, WIDTH)
        self.norm2 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(
            nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH)
        )
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.tokens(tokens) + self.positions(torch.arange(tokens.shape[1]))[None]
        x = self.norm1(h)
        scores = self.query(x) @ self.key(x).transpose(1, 2) / math.sqrt(WIDTH)
        h = h + self.out(scores.softmax(-1) @ self.value(x))
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(1))


def sequences(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Tokens and a label: which quarter of the vocabulary the most frequent token is in."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(VOCAB, (n, LENGTH), generator=generator)
    counts = F.one_hot(tokens, VOCAB).sum(1)
    return tokens, (counts.argmax(1) * CLASSES) // VOCAB


def test_every_layer_of_the_block_has_its_own_kind_of_block() -> None:
    kinds = {layer.name: type(layer) for layer in find_layers(TinyTransformer())}
    assert kinds["tokens"] is kinds["positions"] is EmbeddingLayer
    assert kinds["norm1"] is kinds["norm2"] is ScaleShiftLayer
    assert {kinds[n] for n in ("query", "key", "value", "out", "mlp.0", "mlp.2", "head")} == {
        LinearLayer
    }


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_shared_dense_layers_follow_the_expand_and_reduce_formulas(weight_sharing: str) -> None:
    model = TinyTransformer()
    tokens, _ = sequences(5)
    targets = sample_classes(model(tokens))
    outputs: dict[str, Tensor] = {}
    inputs: dict[str, Tensor] = {}

    def keep(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            inputs[name] = args[0].detach()
            output.retain_grad()
            outputs[name] = output

        return hook

    names = ("query", "value", "mlp.0")
    handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in names]
    F.cross_entropy(model(tokens), targets, reduction="sum").backward()
    for handle in handles:
        handle.remove()
    opt = KFAC(model, weight_sharing=weight_sharing)  # type: ignore[arg-type]
    capture_batch(opt, model, tokens, targets)
    n = tokens.shape[0]
    for name in names:
        a = torch.cat([inputs[name], torch.ones(n, LENGTH, 1)], 2)  # (N, T, d_in + 1)
        g = outputs[name].grad  # per-example loss gradients, (N, T, d_out)
        a_factor, g_factor = shared_layer_factors(a, g, weight_sharing)
        block = opt.blocks[name]
        torch.testing.assert_close(block.a_factor, a_factor, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(block.g_factor, g_factor, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_the_tiny_transformer_trains_with_kfac_and_no_fallback(weight_sharing: str) -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    tokens, labels = sequences(256)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvatureFallbackWarning)
        opt = KFAC(model, lr=0.1, weight_sharing=weight_sharing, scale_shift="full")  # type: ignore[arg-type]
    assert opt.fallbacks == {}
    start, end = fit(opt, model, tokens, labels, steps=30)
    assert end < 0.6 * start
