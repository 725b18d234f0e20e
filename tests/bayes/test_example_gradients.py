"""Per-example gradients kept factored (one position) or as rows (several), and batches of
both kinds joined: every product equals the one from explicit per-example gradients."""

from __future__ import annotations

import pytest
import torch

from ngrl.bayes.example_gradients import LayerExampleGradients

D_OUT, D_IN = 3, 4


def statistics(examples: int, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(examples, positions, D_IN), torch.randn(examples, positions, D_OUT)


def explicit(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``(M, d_out·d_in)``: ``J_n = Σ_t g_{n,t} ā_{n,t}ᵀ`` of every example, in order."""
    return torch.cat([torch.einsum("nto,nti->noi", g, a).flatten(1) for a, g in parts])


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("positions", [(1,), (3,), (1, 1), (2, 2), (1, 3), (3, 1, 2)])
def test_every_product_equals_the_explicit_per_example_gradients(positions: tuple) -> None:
    parts = [statistics(4 + i, t) for i, t in enumerate(positions)]
    joined = LayerExampleGradients.concatenate([LayerExampleGradients(a, g) for a, g in parts])
    rows = explicit(parts)
    assert joined.examples == rows.shape[0] and joined.shape == (D_OUT, D_IN)
    torch.testing.assert_close(joined.dense(), rows)
    torch.testing.assert_close(joined.gram(), rows @ rows.T)
    matrices = torch.randn(D_OUT, D_IN, 2)
    torch.testing.assert_close(joined.inner(matrices), rows @ matrices.reshape(-1, 2))
    weights = torch.randn(rows.shape[0], 2)
    torch.testing.assert_close(joined.combine(weights), (rows.T @ weights).view(D_OUT, D_IN, 2))
    torch.testing.assert_close(joined.squared_sum(), rows.square().sum(0).view(D_OUT, D_IN))
