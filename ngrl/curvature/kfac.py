"""K-FAC: the Kronecker-factored Fisher block of a dense or convolutional layer."""

from __future__ import annotations

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

    _a_sum: Tensor | None
    _g_sum: Tensor | None
    _examples: int
    _positions: int

    # --- statistics -------------------------------------------------------------------
    def accumulate(self, a: Tensor | None, g: Tensor) -> None:
        if a is None:
            raise ValueError("K-FAC needs the layer inputs `a`")
        n, t = a.shape[0], a.shape[1]
        a2 = a.reshape(-1, a.shape[-1])
        g2 = g.reshape(-1, g.shape[-1])
        a_sum = a2.T @ a2
        g_sum = g2.T @ g2
        self._a_sum = a_sum if self._a_sum is None else self._a_sum.add_(a_sum)
        self._g_sum = g_sum if self._g_sum is None else self._g_sum.add_(g_sum)
        self._examples += n
        self._positions += n * t

    def pending_is_finite(self) -> bool:
        if self._a_sum is None or self._g_sum is None:
            return True
        return all_finite(self._a_sum, self._g_sum)

    def commit(self, factor_decay: float) -> None:
        if self._a_sum is None or self._g_sum is None:
            return
        self.a_factor = blend(self.a_factor, self._a_sum / self._examples, factor_decay)
        self.g_factor = blend(self.g_factor, self._g_sum / self._positions, factor_decay)
        self.discard()

    def discard(self) -> None:
        self._a_sum = self._g_sum = None
        self._examples = self._positions = 0
