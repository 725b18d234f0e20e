"""KFAC-corrected: K-FAC plus the best Kronecker approximation of what K-FAC misses."""

from __future__ import annotations

import torch
from torch import Tensor

from ngrl.curvature.base import register
from ngrl.curvature.kpsvd import RearrangedFisher, best_kronecker
from ngrl.curvature.kronecker_sum import KroneckerSumBlock, random_symmetric

__all__ = ["KFACCorrectedBlock"]


@register("kfac-corrected")
class KFACCorrectedBlock(KroneckerSumBlock):
    """KFAC-corrected (Koroko et al. 2022, arXiv:2201.10285, §4.2)::

        F̂ = G ⊗ A + G₂ ⊗ A₂,   (G₂, A₂) = argmin ‖(F − G ⊗ A) − G₂ ⊗ A₂‖_F,

    K-FAC's factors (``A = E[Σ_t ā ā ᵀ]``, ``G = E[(1/T) Σ_t g gᵀ]``) and the best
    Kronecker approximation of the residual, found by power iteration on the rearranged
    residual ``R(F) − vec(G) vec(A)ᵀ`` without forming ``F``. Its Frobenius error is never
    above K-FAC's (the zero correction is one candidate). Damping and inversion: see
    :class:`~ngrl.curvature.kronecker_sum.KroneckerSumBlock`.
    """

    name = "KFAC-corrected"

    def batch_terms(self, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        examples, positions = a.shape[0], a.shape[0] * a.shape[1]
        a_factor = torch.einsum("nti,ntj->ij", a, a) / examples
        g_factor = torch.einsum("nti,ntj->ij", g, g) / positions
        residual = RearrangedFisher(a, g, subtract=[(g_factor, a_factor)])
        start = self.a_correction
        if start is None:
            start = random_symmetric(a.shape[-1], a)
        g_correction, a_correction = best_kronecker(
            residual,
            start,
            iterations=self.power_iterations,
            tolerance=self.tolerance,
            reference=self.a_correction,
        )
        return g_factor, a_factor, g_correction, a_correction
