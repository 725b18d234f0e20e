"""Deflation: the two leading terms of the Kronecker-product SVD of the Fisher block."""

from __future__ import annotations

import torch
from torch import Tensor

from ngrl.curvature.base import register
from ngrl.curvature.kpsvd import RearrangedFisher, best_kronecker
from ngrl.curvature.kronecker_sum import KroneckerSumBlock, random_symmetric

__all__ = ["DeflationBlock"]


@register("deflation")
class DeflationBlock(KroneckerSumBlock):
    """Deflation (Koroko et al. 2022, arXiv:2201.10285, §4.1): the rank-2 truncation of the
    Kronecker-product SVD of the exact block::

        F̂ = σ₁ U₁ ⊗ V₁ + σ₂ U₂ ⊗ V₂,

    the two leading singular pairs of the rearranged block ``R(F)``, the second found by
    power iteration on ``R(F) − σ₁ vec(U₁) vec(V₁)ᵀ``. This is the best approximation of
    ``F`` by a sum of two Kronecker products in Frobenius norm, so its error is never
    above KPSVD's (nor K-FAC's). Damping and inversion: see
    :class:`~ngrl.curvature.kronecker_sum.KroneckerSumBlock`.
    """

    name = "Deflation"

    def batch_terms(self, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        options = dict(iterations=self.power_iterations, tolerance=self.tolerance)
        start = self.a_factor
        if start is None:
            start = torch.einsum("nti,ntj->ij", a, a)
        g_factor, a_factor = best_kronecker(RearrangedFisher(a, g), start, **options)
        deflated = RearrangedFisher(a, g, subtract=[(g_factor, a_factor)])
        second_start = self.a_correction
        if second_start is None:
            second_start = random_symmetric(a.shape[-1], a)
        g_correction, a_correction = best_kronecker(
            deflated, second_start, reference=self.a_correction, **options
        )
        return g_factor, a_factor, g_correction, a_correction
