"""K-FAC for ``nn.Embedding``: the KFC block of a dense layer on one-hot inputs, whose input
factor is diagonal, checked against the exact Fisher block and the equivalent dense layer
(float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ngrl.curvature import EmbeddingBlock, KFACBlock
from ngrl.layers import EmbeddingLayer, find_layers
from ngrl.optim import KFAC
from tests.helpers.oracle import capture_batch, damped_solve, oracle_block, sample_classes

VOCAB, DIM, POSITIONS, CLASSES = 7, 3, 4, 5


def embedding_model(positions: int, **embedding: object) -> nn.Module:
    return nn.Sequential(
        nn.Embedding(VOCAB, DIM, **embedding),  # type: ignore[arg-type]
        nn.Flatten(),
        nn.Linear(positions * DIM, CLASSES),
    )


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("embedding", [{}, {"max_norm": 0.5}], ids=["plain", "max_norm"])
def test_one_index_shared_by_the_batch_gives_the_exact_fisher_block(embedding: dict) -> None:
    model = embedding_model(1, **embedding)
    x = torch.full((6, 1), 2)
    targets = sample_classes(model(x))
    opt = KFAC(model, curvature="kfac")
    capture_batch(opt, model, x, targets)
    block = opt.blocks["0"]
    assert isinstance(block, EmbeddingBlock) and block.shape == (DIM, VOCAB)
    # max_norm rescales looked-up rows in place before the lookup: the Fisher is the plain
    # lookup's at the rescaled table (the oracle cannot vmap the in-place renormalisation).
    model[0].max_norm = None
    exact = oracle_block(model, x, targets, "0")
    torch.testing.assert_close(block.to_dense(), exact, rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("float64")
def test_the_block_is_the_kfc_block_of_the_dense_layer_on_one_hot_inputs() -> None:
    model = embedding_model(POSITIONS)
    dense = nn.Sequential(nn.Linear(VOCAB, DIM, bias=False), nn.Flatten(), nn.Linear(12, 5))
    with torch.no_grad():
        dense[0].weight.copy_(model[0].weight.T)
        dense[2].load_state_dict(model[2].state_dict())
    x = torch.randint(VOCAB, (9, POSITIONS))
    one_hot = F.one_hot(x, VOCAB).double()
    torch.testing.assert_close(dense(one_hot), model(x))
    targets = sample_classes(model(x))
    embedding_opt, dense_opt = KFAC(model), KFAC(dense)
    capture_batch(embedding_opt, model, x, targets)
    capture_batch(dense_opt, dense, one_hot, targets)
    block, reference = embedding_opt.blocks["0"], dense_opt.blocks["0"]
    assert isinstance(reference, KFACBlock)
    torch.testing.assert_close(block.to_dense(), reference.to_dense(), rtol=1e-10, atol=1e-12)
    assert block.a_diagonal is not None
    torch.testing.assert_close(block.a_diagonal.sum(), torch.tensor(float(POSITIONS)))


@pytest.mark.usefixtures("float64")
def test_padding_positions_count_for_neither_factor_and_get_no_step() -> None:
    model = embedding_model(POSITIONS, padding_idx=0)
    x = torch.randint(VOCAB, (8, POSITIONS))
    x[:, 0] = 0
    opt = KFAC(model, kl_clip=None, momentum=0.0)
    output = model[0](x)
    output.retain_grad()
    with opt.capture():
        F.cross_entropy(model[2](model[1](output)), sample_classes(model(x))).backward()
    kept = (x != 0).reshape(-1)
    g = output.grad.reshape(-1, DIM)[kept] * x.shape[0]  # per-example loss gradients
    block = opt.blocks["0"]
    assert block.a_diagonal is not None and block.g_factor is not None
    counts = torch.bincount(x.reshape(-1)[kept], minlength=VOCAB).double() / x.shape[0]
    torch.testing.assert_close(block.a_diagonal, counts)
    torch.testing.assert_close(block.g_factor, g.T @ g / int(kept.sum()))
    padding_row = model[0].weight[0].detach().clone()
    opt.step()
    torch.testing.assert_close(model[0].weight[0].detach(), padding_row, rtol=0, atol=0)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("rule", ["exact", "factored"])
def test_powers_of_the_damped_block_match_the_dense_matrix(rule: str) -> None:
    model = embedding_model(POSITIONS)
    x = torch.randint(VOCAB, (9, POSITIONS))
    opt = KFAC(model, curvature_options={"damping_rule": rule})
    capture_batch(opt, model, x, sample_classes(model(x)))
    block = opt.blocks["0"]
    assert isinstance(block, EmbeddingBlock) and block.damping_rule == rule
    grad = torch.randn(DIM, VOCAB)
    damped = block.damped_dense(0.1)
    expected = damped_solve(damped, grad.reshape(-1), 0.0).reshape(DIM, VOCAB)
    torch.testing.assert_close(block.precondition(grad, 0.1), expected, rtol=1e-8, atol=1e-10)
    values, vectors = torch.linalg.eigh(damped)
    root = (vectors * values.rsqrt()) @ vectors.T
    torch.testing.assert_close(
        block.multiply_matpower(grad, 0.1, -0.5).reshape(-1), root @ grad.reshape(-1)
    )


@pytest.mark.parametrize("option", ["sparse", "scale_grad_by_freq"])
def test_embeddings_without_per_example_gradients_are_refused(option: str) -> None:
    model = nn.Sequential(nn.Embedding(VOCAB, DIM, **{option: True}), nn.Linear(DIM, 2))
    with pytest.raises(ValueError, match=rf"embedding '0' has {option}=True"):
        KFAC(model)


def test_a_checkpoint_round_trip_keeps_the_factors() -> None:
    model = embedding_model(POSITIONS)
    x = torch.randint(VOCAB, (9, POSITIONS))
    opt = KFAC(model)
    capture_batch(opt, model, x, sample_classes(model(x)))
    F.cross_entropy(model(x), sample_classes(model(x), seed=2)).backward()
    opt.step()
    restored = KFAC(model)
    restored.load_state_dict(opt.state_dict())
    for key in ("a_diagonal", "g_factor"):
        torch.testing.assert_close(
            getattr(restored.blocks["0"], key), getattr(opt.blocks["0"], key)
        )
    broken = opt.state_dict()
    first = next(iter(broken["state"].values()))
    first["a_diagonal"] = torch.zeros(VOCAB + 1)
    with pytest.raises(ValueError, match="a_diagonal"):
        restored.load_state_dict(broken)


def test_the_layer_is_found_with_the_transposed_block_view() -> None:
    embedding = nn.Embedding(VOCAB, DIM)
    (layer,) = find_layers(embedding)
    assert isinstance(layer, EmbeddingLayer) and layer.shape == (DIM, VOCAB)
    weight = torch.randn(VOCAB, DIM)
    torch.testing.assert_close(layer.gather([weight]), weight.T)
    torch.testing.assert_close(layer.scatter(layer.gather([weight]))[0], weight)
