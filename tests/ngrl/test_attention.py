"""K-FAC for ``nn.MultiheadAttention``: its packed in-projection and its out-projection as
dense maps shared by positions, recomputed outside the attention (``ngrl.attention``),
checked against the module, the exact Fisher and the expand/reduce formulas written from
per-position quantities."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngrl.attention import unroll
from ngrl.layers import AttentionLayer, GenericLayer, find_layers
from ngrl.optim import KFAC, CurvatureFallbackWarning
from tests.helpers.oracle import capture_batch, fit, sample_classes, shared_layer_factors
from tests.ngrl.test_recurrent import exact_block

E, HEADS, QUERIES, KEYS, BATCH, CLASSES = 8, 2, 5, 4, 6, 3


def attention_inputs(case: str, batch_first: bool) -> tuple[tuple[Tensor, ...], dict]:
    """The arguments of one call for each way of calling the module."""

    def seq(length: int) -> Tensor:
        return torch.randn((BATCH, length, E) if batch_first else (length, BATCH, E))

    x = seq(QUERIES)
    if case == "self, key padding":
        padding = torch.zeros(BATCH, QUERIES, dtype=torch.bool)
        padding[:, -1] = True
        return (x, x, x), {"key_padding_mask": padding}
    if case == "key is value":
        context = seq(KEYS)
        return (x, context, context), {}
    if case == "three tensors, float mask":
        mask = torch.randn(QUERIES, KEYS)
        return (x, seq(KEYS), seq(KEYS)), {"attn_mask": mask, "need_weights": False}
    if case == "unbatched, causal":
        sequence = torch.randn(QUERIES, E)
        causal = nn.Transformer.generate_square_subsequent_mask(QUERIES)
        return (sequence, sequence, sequence), {"attn_mask": causal, "is_causal": True}
    raise ValueError(case)


CASES = ["self, key padding", "key is value", "three tensors, float mask", "unbatched, causal"]


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("add_zero_attn", [False, True], ids=["", "zero-attn"])
def test_the_recomputation_gives_the_modules_output_weights_and_gradients(
    case: str, batch_first: bool, add_zero_attn: bool
) -> None:
    module = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, add_zero_attn=add_zero_attn)
    args, kwargs = attention_inputs(case, batch_first)
    expected, expected_weights = module(*args, **kwargs)
    (output, weights), maps = unroll(module, args, kwargs)
    torch.testing.assert_close(output, expected)
    if expected_weights is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, expected_weights)
    params = list(module.parameters())
    want = torch.autograd.grad(expected.square().sum(), params)
    got = torch.autograd.grad(output.square().sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    distinct = len({id(a) for a in args[:3]})
    positions = {1: QUERIES, 2: QUERIES + KEYS, 3: QUERIES + 2 * KEYS}[distinct]
    in_proj, out_proj = maps
    assert in_proj.part == "in_proj" and in_proj.output.shape[1:] == (positions, 3 * E)
    assert out_proj.part == "out_proj" and out_proj.inputs.shape[1:] == (QUERIES, E)


class Attender(nn.Module):
    """Attention over ``(N, T, E)`` inputs and a dense head on its mean: self-attention,
    or the first ``QUERIES`` positions attending to the rest (``key is value``)."""

    def __init__(self, cross: bool) -> None:
        super().__init__()
        self.cross = cross
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.head = nn.Linear(E, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        if self.cross:
            query, context = x[:, :QUERIES], x[:, QUERIES:]
            return self.head(self.attn(query, context, context)[0].mean(1))
        return self.head(self.attn(x, x, x)[0].mean(1))


def by_hand(
    model: Attender, x: Tensor, offsets: dict[str, Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The model's logits with attention written out per head, and the inputs of the two
    maps (query, context, mixed heads); ``offsets`` are zero tensors added to the query,
    key, value and out-projection outputs, so that their gradients are those outputs'
    gradients."""
    attn = model.attn
    w, b = attn.in_proj_weight, attn.in_proj_bias
    query, context = (x[:, :QUERIES], x[:, QUERIES:]) if model.cross else (x, x)
    q = query @ w[:E].T + b[:E] + offsets["q"]
    k = context @ w[E : 2 * E].T + b[E : 2 * E] + offsets["k"]
    v = context @ w[2 * E :].T + b[2 * E :] + offsets["v"]
    d = E // HEADS

    def heads(t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], t.shape[1], HEADS, d).transpose(1, 2)

    scores = heads(q) @ heads(k).transpose(2, 3) / math.sqrt(d)
    mixed = (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(q.shape)
    out = mixed @ attn.out_proj.weight.T + attn.out_proj.bias + offsets["out"]
    return model.head(out.mean(1)), query, context, mixed


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("cross", [False, True], ids=["self", "key-is-value"])
@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_the_projections_factors_follow_the_formulas_from_per_position_quantities(
    cross: bool, weight_sharing: str
) -> None:
    model = Attender(cross)
    x = torch.randn(BATCH, QUERIES + (KEYS if cross else 0), E)
    targets = sample_classes(model(x))
    opt = KFAC(model, weight_sharing=weight_sharing)  # type: ignore[arg-type]
    capture_batch(opt, model, x, targets)
    keys = KEYS if cross else QUERIES
    offsets = {
        "q": torch.zeros(BATCH, QUERIES, E, requires_grad=True),
        "k": torch.zeros(BATCH, keys, E, requires_grad=True),
        "v": torch.zeros(BATCH, keys, E, requires_grad=True),
        "out": torch.zeros(BATCH, QUERIES, E, requires_grad=True),
    }
    logits, query, context, mixed = by_hand(model, x, offsets)
    torch.testing.assert_close(logits, model(x))
    F.cross_entropy(logits, targets, reduction="sum").backward()  # per-example gradients
    grads = {name: offset.grad for name, offset in offsets.items()}
    ones = torch.ones(BATCH, 1, 1)

    def homogeneous(a: Tensor) -> Tensor:
        return torch.cat([a, ones.expand(-1, a.shape[1], 1)], dim=2)

    zeros = torch.zeros_like
    if cross:  # the query's positions feed q, the context's k and v
        a = homogeneous(torch.cat([query, context], dim=1))
        g = torch.cat(
            [
                torch.cat([grads["q"], zeros(grads["q"]), zeros(grads["q"])], dim=2),
                torch.cat([zeros(grads["k"]), grads["k"], grads["v"]], dim=2),
            ],
            dim=1,
        )
    else:
        a = homogeneous(x)
        g = torch.cat([grads["q"], grads["k"], grads["v"]], dim=2)
    for name, (a_map, g_map) in {
        "attn.in_proj": (a, g),
        "attn.out_proj": (homogeneous(mixed.detach()), grads["out"]),
    }.items():
        a_factor, g_factor = shared_layer_factors(a_map, g_map, weight_sharing)
        block = opt.blocks[name]
        torch.testing.assert_close(block.a_factor, a_factor, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(block.g_factor, g_factor, rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("float64")
def test_one_position_and_a_shared_input_give_the_exact_fisher_block() -> None:
    """With one position and the same input for every example, each map's per-example
    gradient is ``g_n āᵀ`` with one ``ā``: the Kronecker block is the exact Fisher block."""
    model = Attender(cross=False)
    x = torch.randn(1, 1, E).expand(7, 1, E).contiguous()
    targets = sample_classes(model(x))
    opt = KFAC(model)
    capture_batch(opt, model, x, targets)
    for name in ("attn.in_proj", "attn.out_proj"):
        torch.testing.assert_close(
            opt.blocks[name].to_dense(), exact_block(model, x, targets, name), rtol=1e-9, atol=1e-12
        )


class Encoder(nn.Module):
    """PyTorch's own transformer encoder layer over token embeddings, mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(11, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.tokens(tokens)).mean(1))


def test_a_transformer_encoder_layer_trains_with_kfac_and_no_fallback() -> None:
    torch.manual_seed(0)
    model = Encoder()
    tokens = torch.randint(11, (256, 6))
    labels = (F.one_hot(tokens, 11).sum(1).argmax(1) * 4) // 11  # the most frequent token
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvatureFallbackWarning)
        opt = KFAC(model, lr=0.1)
    assert opt.fallbacks == {}
    kinds = {layer.name: type(layer) for layer in opt.layers}
    attention = "encoder.self_attn"
    assert kinds[f"{attention}.in_proj"] is kinds[f"{attention}.out_proj"] is AttentionLayer
    start, end = fit(opt, model, tokens, labels, steps=30)
    assert end < 0.5 * start


@pytest.mark.parametrize(
    "options", [dict(add_bias_kv=True), dict(kdim=5, vdim=3)], ids=["bias-kv", "kdim"]
)
def test_an_attention_outside_the_two_maps_falls_back_by_name(options: dict) -> None:
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(E, HEADS, **options))
    with pytest.warns(CurvatureFallbackWarning, match=r"attn \(MultiheadAttention\)"):
        opt = KFAC(model)
    assert "attn" in opt.fallbacks
    assert all(isinstance(layer, GenericLayer) for layer in find_layers(model))


def test_a_skipped_attention_leaves_both_of_its_maps_out() -> None:
    names = [layer.name for layer in find_layers(Attender(cross=False), skip_layers=["attn"])]
    assert names == ["head"]


@pytest.mark.usefixtures("float64")
def test_two_optimizers_on_one_attention_share_its_recomputed_forward() -> None:
    model = Attender(cross=True)
    x = torch.randn(BATCH, QUERIES + KEYS, E)
    targets = sample_classes(model(x))
    alone = KFAC(model)
    capture_batch(alone, model, x, targets)
    expected = {name: alone.blocks[name].to_dense() for name in ("attn.in_proj", "attn.out_proj")}
    alone.remove_hooks()
    first, second = KFAC(model), KFAC(model)
    with first.capture(), second.capture():
        F.cross_entropy(model(x), targets).backward()
    for opt in (first, second):
        for name, block in expected.items():
            torch.testing.assert_close(opt.blocks[name].to_dense(), block, rtol=1e-10, atol=1e-12)
