"""KPSVD: the Kronecker product closest to the exact Fisher block in Frobenius norm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ngrl.curvature.base import PendingStatistics, blend, register
from ngrl.curvature.kronecker_product import KroneckerProductBlock

__all__ = ["KPSVDBlock", "RearrangedFisher", "best_kronecker", "check_power_iteration_options"]


class RearrangedFisher:
    """Van Loan's rearrangement ``R(F)`` of the exact block, as an operator never formed.

    ``F = E_n[vec(∇Ŵ_n) vec(∇Ŵ_n)ᵀ]`` with ``∇Ŵ_n = Σ_t g_{n,t} ā_{n,t}ᵀ``; ``R`` reorders
    it so that ``‖F − B ⊗ C‖_F = ‖R(F) − vec(B) vec(C)ᵀ‖_F`` (Van Loan & Pitsianis 1993).
    With ``Ā_n`` (``T × d_in``) and ``Ĝ_n`` (``T × d_out``) one example's rows::

        R(F) vec(C)  = E_n[Ĝ_nᵀ (Ā_n C Ā_nᵀ) Ĝ_n],    R(F)ᵀ vec(B) = E_n[Ā_nᵀ (Ĝ_n B Ĝ_nᵀ) Ā_n],

    each ``O(N T (d_in² + d_out² + T d))``; for dense layers (``T = 1``) the ``T × T`` middle
    is one number per example, ``ā_nᵀ C ā_n``. ``subtract`` holds Kronecker terms
    ``(B_k, C_k)`` taken off ``F`` first (deflation, or K-FAC's product for a residual).
    """

    def __init__(
        self, a: Tensor, g: Tensor, subtract: Sequence[tuple[Tensor, Tensor]] = ()
    ) -> None:
        self.a, self.g = a, g
        self.subtract = list(subtract)

    def _sandwich(self, rows: Tensor, middle: Tensor, outer: Tensor) -> Tensor:
        # E_n[outer_nᵀ (rows_n M rows_nᵀ) outer_n] without an (N, d, d) intermediate.
        n = outer.shape[0]
        if rows.shape[1] == 1:  # one position: the middle is a number per example
            weights = ((rows[:, 0] @ middle) * rows[:, 0]).sum(1, keepdim=True)
            result = (outer[:, 0] * weights).T @ outer[:, 0] / n
        else:
            inner = torch.bmm(rows @ middle, rows.transpose(1, 2))  # (N, T, T)
            weighted = torch.bmm(inner, outer)
            flat = outer.reshape(-1, outer.shape[-1])
            result = flat.T @ weighted.reshape(-1, outer.shape[-1]) / n
        return 0.5 * (result + result.T)

    def times(self, a_side: Tensor) -> Tensor:
        """``R(F) vec(C)`` as a ``d_out × d_out`` matrix."""
        result = self._sandwich(self.a, a_side, self.g)
        for g_term, a_term in self.subtract:
            result -= g_term * (a_term * a_side).sum()
        return result

    def transpose_times(self, g_side: Tensor) -> Tensor:
        """``R(F)ᵀ vec(B)`` as a ``d_in × d_in`` matrix."""
        result = self._sandwich(self.g, g_side, self.a)
        for g_term, a_term in self.subtract:
            result -= a_term * (g_term * g_side).sum()
        return result


def best_kronecker(
    operator: RearrangedFisher,
    start: Tensor,
    *,
    iterations: int = 3,
    tolerance: float = 1e-4,
    reference: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(B, C)`` with ``B ⊗ C`` the best Kronecker approximation, ``‖B‖_F = ‖C‖_F = √σ₁``.

    Alternating power iteration for the leading singular pair ``(σ₁, u, v)`` of ``R``,
    started from ``vec(start)``, until the unit ``v`` moves less than ``tolerance`` (or
    ``iterations`` rounds). The pair's sign is chosen so that ``⟨C, reference⟩ ≥ 0``
    (``reference`` defaults to the identity: a PSD ``C`` comes out with positive trace).
    Returns zeros when ``R`` is zero.
    """
    a_side = start / start.norm().clamp_min(torch.finfo(start.dtype).tiny)
    d_out = operator.g.shape[-1]
    g_side = a_side.new_zeros(d_out, d_out)
    sigma = a_side.new_tensor(0.0)
    for _ in range(iterations):
        g_side = operator.times(a_side)
        g_norm = g_side.norm()
        if float(g_norm) == 0.0:
            return torch.zeros_like(g_side), torch.zeros_like(a_side)
        g_side = g_side / g_norm
        new_a = operator.transpose_times(g_side)
        sigma = new_a.norm()
        new_a = new_a / sigma
        moved = float((new_a - a_side).norm())
        a_side = new_a
        if moved <= tolerance:
            break
    sign_to = (
        reference
        if reference is not None
        else torch.eye(a_side.shape[0], dtype=a_side.dtype, device=a_side.device)
    )
    if float((a_side * sign_to).sum()) < 0.0:
        a_side, g_side = -a_side, -g_side
    root = sigma.sqrt()
    return root * g_side, root * a_side


def check_power_iteration_options(power_iterations: int, tolerance: float) -> None:
    """``ValueError`` naming the option unless ``power_iterations >= 1`` and ``tolerance >= 0``."""
    if not (isinstance(power_iterations, int) and power_iterations >= 1):
        raise ValueError(f"Invalid power_iterations: {power_iterations!r} (must be >= 1)")
    if not tolerance >= 0.0:
        raise ValueError(f"Invalid tolerance: {tolerance!r} (must be >= 0)")


@register("kpsvd")
class KPSVDBlock(KroneckerProductBlock):
    """KPSVD (Koroko et al. 2022, arXiv:2201.10285): ``F̂ = G ⊗ A`` with

        (G, A) = argmin_{G, A} ‖F − G ⊗ A‖_F,

    the leading singular pair of the rearranged exact block ``R(F)`` (see
    :class:`RearrangedFisher`), found by power iteration over the per-example inputs and
    output gradients, never forming ``F``. K-FAC's ``G ⊗ A`` is one Kronecker product
    among all, so KPSVD's Frobenius error is never above K-FAC's.

    Each captured batch gets its own pair (warm-started from the running ``A``), scaled so
    both factors have norm ``√σ₁``; the running factors blend them with ``factor_decay``
    like K-FAC's. The factors are PSD (the power iteration maps PSD matrices to PSD
    matrices), so the block is inverted like every Kronecker product
    (:class:`KroneckerProductBlock`): exact damping in the eigenbases, or the factored rule.

    Args:
        shape: ``(d_out, d_in)`` of the combined parameter ``Ŵ = [W | b]``.
        damping_rule: ``"exact"`` (default) or ``"factored"``, as for K-FAC.
        power_iterations: most power-iteration rounds per batch (3: each batch starts
            from the running factors, so the rounds accumulate over batches while the
            Fisher drifts slowly; on the autoencoder benchmark 3 rounds train as well as
            10 at two thirds of the cost).
        tolerance: stop when the unit input-side factor moves less than this.
        float64_max_dim: factors up to this size are decomposed in float64.
    """

    data_parallel = "local"  # power iterations are not linear in the batch

    def __init__(
        self,
        shape: tuple[int, ...],
        *,
        damping_rule: Literal["exact", "factored"] = "exact",
        power_iterations: int = 3,
        tolerance: float = 1e-4,
        float64_max_dim: int = 1024,
    ) -> None:
        check_power_iteration_options(power_iterations, tolerance)
        self.power_iterations = power_iterations
        self.tolerance = tolerance
        self._pending = PendingStatistics()
        super().__init__(shape, damping_rule=damping_rule, float64_max_dim=float64_max_dim)

    def accumulate(self, a: Tensor | None, g: Tensor) -> None:
        self._pending.add(a, g, "KPSVD")

    def pending_is_finite(self) -> bool:
        return self._pending.derived_is_finite(self.batch_factors)

    def batch_factors(self, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """``(G, A)`` of one batch, warm-started from the running ``A``."""
        start = self.a_factor if self.a_factor is not None else torch.einsum("nti,ntj->ij", a, a)
        return best_kronecker(
            RearrangedFisher(a, g),
            start,
            iterations=self.power_iterations,
            tolerance=self.tolerance,
        )

    def commit(self, factor_decay: float) -> None:
        factors = self._pending.derived(self.batch_factors)
        if factors is None:
            return
        g_factor, a_factor = factors
        self.a_factor = blend(self.a_factor, a_factor, factor_decay)
        self.g_factor = blend(self.g_factor, g_factor, factor_decay)
        self.discard()

    def discard(self) -> None:
        self._pending.clear()
