"""K-FAC for an embedding layer: a Kronecker product whose input factor is diagonal."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ngrl.curvature.base import (
    CurvatureBlock,
    blend,
    checked_state,
    matrix_shape,
    pi_split,
    symmetric_eigh,
)
from ngrl.linalg import all_finite

__all__ = ["EmbeddingBlock"]


class EmbeddingBlock(CurvatureBlock):
    """The KFC block of ``nn.Embedding``, ``F̂ = G ⊗ diag(c)``.

    An embedding is a dense layer on one-hot inputs (Martens & Grosse 2015's factors with
    ``ā_t = e_{i_t}``), so K-FAC's input factor ``A = E_n[Σ_t e_{i_t} e_{i_t}ᵀ]`` is
    diagonal: ``c_v = E_n[#{t : i_{n,t} = v}]``, how often each row is looked up per
    example. With ``g_t`` the per-example output gradient at position ``t``::

        c_v = E_n[Σ_t 1{i_t = v}],   G = E_n[(1/T) Σ_t g_t g_tᵀ],

    each an exponential average over batches; positions at ``padding_idx`` (index
    ``-1`` in the statistics) count for neither. The block stores ``D² + V`` numbers for a
    ``V × D`` table, and preconditions in ``G``'s eigenbasis ``G = Q diag(s) Qᵀ`` (the
    identity is ``A``'s)::

        X = Q [ (Qᵀ ∇Ŵ) / (s cᵀ + λ) ]                       (damping_rule="exact")
        X = Q [ (Qᵀ ∇Ŵ) / ((s + γ_G)(c + γ_A)ᵀ) ]            (damping_rule="factored")

    with ``γ_A γ_G = λ`` split by the factors' mean eigenvalues (Martens & Grosse 2015, §6.3).

    Args:
        shape: ``(embedding_dim, num_embeddings)``, the block view ``Wᵀ``.
        damping_rule: ``"exact"`` (default) or ``"factored"``.
        float64_max_dim: ``G`` up to this size is decomposed in float64.
    """

    state_keys = ("a_diagonal", "g_factor")
    derived_keys = ("_eigen",)
    #: Moments of the batch: their average over ranks is the union batch's.
    data_parallel = "share"

    def __init__(
        self,
        shape: tuple[int, ...],
        *,
        damping_rule: Literal["exact", "factored"] = "exact",
        float64_max_dim: int = 1024,
    ) -> None:
        self.shape = matrix_shape(shape, "EmbeddingBlock", damping_rule)
        self.damping_rule = damping_rule
        self.float64_max_dim = float64_max_dim
        self.a_diagonal: Tensor | None = None
        self.g_factor: Tensor | None = None
        self._eigen: tuple[Tensor, Tensor] | None = None
        self.discard()

    # --- statistics -------------------------------------------------------------------
    def accumulate(self, a: Tensor | None, g: Tensor) -> None:
        if a is None or a.is_floating_point():
            raise ValueError("EmbeddingBlock needs the looked-up indices `a` (integers)")
        kept = a.reshape(-1) >= 0
        indices = a.reshape(-1)[kept]
        rows = g.reshape(-1, g.shape[-1])[kept]
        counts = torch.bincount(indices, minlength=self.shape[1]).to(g.dtype)
        g_sum = rows.T @ rows
        if self._counts is None or self._g_sum is None:
            self._counts, self._g_sum = counts, g_sum
        else:
            self._counts.add_(counts)
            self._g_sum.add_(g_sum)
        self._examples += a.shape[0]
        self._positions += int(kept.sum())

    def pending_is_finite(self) -> bool:
        return self._g_sum is None or all_finite(self._g_sum)

    def commit(self, factor_decay: float) -> None:
        if self._counts is None or self._g_sum is None:
            return
        self.a_diagonal = blend(self.a_diagonal, self._counts / self._examples, factor_decay)
        self.g_factor = blend(self.g_factor, self._g_sum / max(self._positions, 1), factor_decay)
        self.discard()

    def discard(self) -> None:
        self._counts: Tensor | None = None
        self._g_sum: Tensor | None = None
        self._examples = self._positions = 0

    @property
    def initialized(self) -> bool:
        return self.a_diagonal is not None and self.g_factor is not None

    # --- inverse ----------------------------------------------------------------------
    def refresh(self, damping: float) -> None:
        if self.g_factor is not None:
            self._eigen = symmetric_eigh(self.g_factor, self.float64_max_dim)

    def _damped_eigenvalues(self, damping: float) -> tuple[Tensor, Tensor]:
        """``(Q, S)``: ``G``'s eigenvectors and the ``(d_out, d_in)`` eigenvalues of the
        matrix :meth:`precondition` inverts."""
        if self._eigen is None:
            self.refresh(damping)
        assert self._eigen is not None and self.a_diagonal is not None, "no statistics yet"
        values, vectors = self._eigen
        if self.damping_rule == "factored":
            a_damping, g_damping = pi_split(self.a_diagonal, values, damping)
            return vectors, torch.outer(values + g_damping, self.a_diagonal + a_damping)
        return vectors, torch.outer(values, self.a_diagonal) + damping

    def precondition(self, grad: Tensor, damping: float) -> Tensor:
        return self._matpower(grad, damping, -1.0)

    def _matpower(self, v: Tensor, damping: float, power: float) -> Tensor:
        vectors, eigenvalues = self._damped_eigenvalues(damping)
        return vectors @ ((vectors.T @ v) * eigenvalues.pow(power))

    def to_dense(self) -> Tensor:
        assert self.a_diagonal is not None and self.g_factor is not None
        return torch.kron(self.g_factor, torch.diag(self.a_diagonal))

    def damped_dense(self, damping: float) -> Tensor:
        if self.damping_rule == "exact":
            return super().damped_dense(damping)
        assert self.a_diagonal is not None and self.g_factor is not None
        a_damping, g_damping = pi_split(self.a_diagonal, self.g_factor, damping)
        eye = torch.eye(self.shape[0], dtype=self.g_factor.dtype, device=self.g_factor.device)
        return torch.kron(self.g_factor + g_damping * eye, torch.diag(self.a_diagonal + a_damping))

    # --- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        if self.a_diagonal is None or self.g_factor is None:
            return {}
        return {"a_diagonal": self.a_diagonal.clone(), "g_factor": self.g_factor.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.discard()
        self._eigen = None
        if not state:
            self.a_diagonal = self.g_factor = None
            return
        d_out, d_in = self.shape
        self.a_diagonal = checked_state(state, "a_diagonal", (d_in,), "EmbeddingBlock")
        self.g_factor = checked_state(state, "g_factor", (d_out, d_out), "EmbeddingBlock")
