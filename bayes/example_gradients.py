"""One layer's per-example gradients, kept factored where the layer allows it.

A dense layer's per-example gradient is rank one, ``J_n = g_n ā_nᵀ``: its Gram matrix, its
inner products with other matrices and its weighted sums need no ``(N, d_out, d_in)``
tensor. Layers that share weights over positions (convolutions: ``J_n = Σ_t g_{n,t}
ā_{n,t}ᵀ``) form the per-example gradients once and use them as rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ngrl.capture import example_gradients, squared_gradient_sum

__all__ = ["LayerExampleGradients"]


class LayerExampleGradients:
    """The per-example gradients ``J_n`` (``n < M``) of one layer, ``(d_out, d_in)`` each,
    from its ``"expand"`` statistics ``a`` ``(M, T, d_in)`` and ``g`` ``(M, T, d_out)``.

    Matrices of the layer's parameters ``X`` come in block layout, ``(d_out, d_in, L)`` for
    ``L`` of them.
    """

    def __init__(self, a: Tensor, g: Tensor) -> None:
        self.a, self.g = a, g
        self.examples = a.shape[0]
        self.shape = (g.shape[-1], a.shape[-1])
        # Rows J_n, flattened, for layers with several positions per example.
        self.rows = None if a.shape[1] == 1 else example_gradients(a, g).flatten(1)

    @classmethod
    def from_rows(cls, rows: Tensor, shape: tuple[int, int]) -> LayerExampleGradients:
        """Per-example gradients given as their flattened rows ``(M, d_out·d_in)``."""
        gradients = cls.__new__(cls)
        gradients.a = gradients.g = rows[:0, None, :0]  # never read: the rows are
        gradients.rows = rows
        gradients.examples = rows.shape[0]
        gradients.shape = shape
        return gradients

    def gram(self) -> Tensor:
        """``⟨J_n, J_m⟩``, ``(M, M)``: ``(g gᵀ)∘(ā āᵀ)`` for one position per example."""
        if self.rows is not None:
            return self.rows @ self.rows.T
        g, a = self.g[:, 0], self.a[:, 0]
        return (g @ g.T) * (a @ a.T)

    def inner(self, matrices: Tensor) -> Tensor:
        """``⟨J_n, X_l⟩`` for ``matrices`` ``(d_out, d_in, L)``: ``(M, L)``, ``g_nᵀ X_l ā_n``."""
        d_out, d_in, count = matrices.shape
        if self.rows is not None:
            return self.rows @ matrices.reshape(d_out * d_in, count)
        left = (self.g[:, 0] @ matrices.reshape(d_out, d_in * count)).view(-1, d_in, count)
        return torch.einsum("mil,mi->ml", left, self.a[:, 0])

    def combine(self, weights: Tensor) -> Tensor:
        """``Σ_n c_{n,l} J_n`` for ``weights`` ``(M, L)``: ``(d_out, d_in, L)``, each
        ``gᵀ diag(c_l) ā``."""
        d_out, d_in = self.shape
        count = weights.shape[1]
        if self.rows is not None:
            return (self.rows.T @ weights).view(d_out, d_in, count)
        scaled = (self.a[:, 0, :, None] * weights[:, None, :]).reshape(self.examples, -1)
        return (self.g[:, 0].T @ scaled).view(d_out, d_in, count)

    def squared_sum(self) -> Tensor:
        """``Σ_n J_n²`` (elementwise), ``(d_out, d_in)``."""
        if self.rows is not None:
            return self.rows.square().sum(0).view(self.shape)
        return squared_gradient_sum(self.a, self.g)

    def dense(self) -> Tensor:
        """The rows ``J_n``, flattened: ``(M, d_out·d_in)``."""
        if self.rows is not None:
            return self.rows
        return example_gradients(self.a, self.g).flatten(1)

    @staticmethod
    def concatenate(parts: list[LayerExampleGradients]) -> LayerExampleGradients:
        """The examples of several batches of the same layer, in order."""
        if len(parts) == 1:
            return parts[0]
        positions = {part.a.shape[1] for part in parts}
        if len(positions) == 1:
            return LayerExampleGradients(
                torch.cat([p.a for p in parts]), torch.cat([p.g for p in parts])
            )
        # Different numbers of positions (a layer applied to inputs of two sizes): rows.
        return LayerExampleGradients.from_rows(
            torch.cat([p.dense() for p in parts]), parts[0].shape
        )
