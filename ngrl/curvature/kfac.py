"""K-FAC: the Kronecker-factored Fisher block of a dense or convolutional layer."""

from __future__ import annotations

import torch
from torch import Tensor

from ngrl.curvature.base import blend, register
from ngrl.curvature.kronecker_product import KroneckerProductBlock
from ngrl.linalg import all_finite

__all__ = ["KFACBlock"]


@register("kfac")
class KFACBlock(KroneckerProductBlock):
    """Kronecker-factored approximate curvature of one layer.

    Martens & Grosse 2015 (arXiv:1503.05671) for dense layers, Grosse & Martens 2016
    (KFC, arXiv:1602.01407) for convolutions. With ``ā`` the input with its homogeneous
    coordinate and ``g`` the per-example output gradient at each of ``T`` positions::

        A = E_n[Σ_t ā_t ā_tᵀ],   G = E_n[(1/T) Σ_t g_t g_tᵀ],   F ≈ G ⊗ A,

    each an exponential average over batches (``factor_decay``). How ``G ⊗ A`` is damped
    and inverted (exactly in the eigenbases, or with the factored rule):
    :class:`KroneckerProductBlock`.

    Args:
        shape: ``(d_out, d_in)`` of the combined parameter ``Ŵ = [W | b]``.
        damping_rule: ``"exact"`` (default) or ``"factored"``.
        float64_max_dim: factors up to this size are decomposed in float64.
    """

    #: Moments of the batch: their average over ranks is the union batch's (KAISA).
    data_parallel = "share"

    _pending: list[tuple[Tensor, Tensor]]
    _examples: int

    # --- statistics -------------------------------------------------------------------
    def accumulate(self, a: Tensor | None, g: Tensor) -> None:
        if a is None:
            raise ValueError("K-FAC needs the layer inputs `a`")
        # Kept as rows until the commit: a layer called once per time step hands over many
        # small batches, whose moments one matrix product forms faster than many.
        self._pending.append((a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])))
        self._examples += a.shape[0]

    def _sums(self) -> tuple[Tensor, Tensor]:
        """``(Σ ā āᵀ, Σ g gᵀ)`` over the pending rows."""
        if len(self._pending) > 1:
            self._pending = [
                (torch.cat([a for a, _ in self._pending]), torch.cat([g for _, g in self._pending]))
            ]
        a, g = self._pending[0]
        return a.T @ a, g.T @ g

    def pending_is_finite(self) -> bool:
        return not self._pending or all_finite(*(t for pair in self._pending for t in pair))

    def commit(self, factor_decay: float) -> None:
        if not self._pending:
            return
        positions = sum(g.shape[0] for _, g in self._pending)
        a_sum, g_sum = self._sums()
        self.a_factor = blend(self.a_factor, a_sum / self._examples, factor_decay)
        self.g_factor = blend(self.g_factor, g_sum / positions, factor_decay)
        self.discard()

    def discard(self) -> None:
        self._pending = []
        self._examples = 0
