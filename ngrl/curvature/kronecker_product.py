"""The structure ``F̂ = G ⊗ A``: one Kronecker product of two running factors, inverted."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ngrl.curvature.base import (
    CurvatureBlock,
    checked_state,
    damped_inverse,
    eigenbasis_power,
    eigenbasis_sample,
    eigenbasis_solve,
    factored_kronecker,
    matrix_shape,
    pi_split,
    symmetric_eigh,
)

__all__ = ["KroneckerProductBlock"]


class KroneckerProductBlock(CurvatureBlock):
    """A Fisher block that is one Kronecker product ``F̂ = G ⊗ A`` of two PSD factors.

    This class is how such a block is *inverted*; how ``A`` and ``G`` are *estimated* is
    its subclasses' (``accumulate``, ``commit``, ``discard``, ``pending_is_finite`` set
    :attr:`a_factor` and :attr:`g_factor`): K-FAC's moments (:class:`KFACBlock`), the
    Frobenius-closest pair (:class:`KPSVDBlock`), K-FAC with its trace restored
    (:class:`TKFACBlock`).

    Preconditioning solves ``G X A + λX = ∇Ŵ`` exactly (Tikhonov damping of the whole
    Kronecker product) in the factors' eigenbases ``A = Q_A diag(d_A) Q_Aᵀ``,
    ``G = Q_G diag(d_G) Q_Gᵀ``::

        X = Q_G [ (Q_Gᵀ ∇Ŵ Q_A) / (d_G d_Aᵀ + λ) ] Q_Aᵀ.

    With ``damping_rule="factored"`` (Martens & Grosse 2015, §6.3) the damping is split
    between the factors, ``(G + γ_G I) ⊗ (A + γ_A I)`` with ``γ_A = π√λ``, ``γ_G = √λ/π``
    and ``π² = (tr A / d_in) / (tr G / d_out)``, so that preconditioning is two products
    with explicit inverses, ``X = (G + γ_G I)⁻¹ ∇Ŵ (A + γ_A I)⁻¹``: one large matrix
    product instead of two, and Cholesky inverses instead of eigendecompositions. The
    inverses are computed at :meth:`refresh` with the damping of that step.

    Args:
        shape: ``(d_out, d_in)`` of the combined parameter ``Ŵ = [W | b]``.
        damping_rule: ``"exact"`` (default) or ``"factored"``.
        float64_max_dim: factors up to this size are decomposed in float64.
    """

    state_keys = ("a_factor", "g_factor")
    derived_keys = ("_eigen", "_inverses")

    def __init__(
        self,
        shape: tuple[int, ...],
        *,
        damping_rule: Literal["exact", "factored"] = "exact",
        float64_max_dim: int = 1024,
    ) -> None:
        self.shape = matrix_shape(shape, type(self).__name__, damping_rule)
        self.damping_rule = damping_rule
        self.float64_max_dim = float64_max_dim
        self.a_factor: Tensor | None = None
        self.g_factor: Tensor | None = None
        self._eigen: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self._inverses: tuple[Tensor, Tensor] | None = None
        # The eigendecompositions of ``_inverses`` (for powers other than −1), with the
        # inverses they were computed from: whoever replaces the inverses invalidates them.
        self._inverse_eigen: tuple[tuple[Tensor, Tensor], tuple[Tensor, ...]] | None = None
        self.discard()  # the estimator's pending statistics start empty

    @property
    def initialized(self) -> bool:
        return self.a_factor is not None and self.g_factor is not None

    # --- inverse ----------------------------------------------------------------------
    def factors(self) -> tuple[Tensor, Tensor]:
        """``(G, A)`` of the Kronecker product this block stands for, ``F̂ = G ⊗ A``.

        The running factors themselves; blocks that rescale them (TKFAC) override this.
        """
        assert self.a_factor is not None and self.g_factor is not None
        return self.g_factor, self.a_factor

    def factored_damping(self, damping: float) -> tuple[float, float]:
        """``(γ_A, γ_G)`` of the factored rule: ``γ_A γ_G = λ``, split by the traces."""
        g_factor, a_factor = self.factors()
        return pi_split(a_factor, g_factor, damping)

    def refresh(self, damping: float) -> None:
        if not self.initialized:
            return
        g_factor, a_factor = self.factors()
        if self.damping_rule == "factored":
            a_damping, g_damping = self.factored_damping(damping)
            self._inverses = (
                damped_inverse(a_factor, a_damping, self.float64_max_dim),
                damped_inverse(g_factor, g_damping, self.float64_max_dim),
            )
            return
        a_values, a_vectors = symmetric_eigh(a_factor, self.float64_max_dim)
        g_values, g_vectors = symmetric_eigh(g_factor, self.float64_max_dim)
        self._eigen = (a_values, a_vectors, g_values, g_vectors)

    def precondition(self, grad: Tensor, damping: float) -> Tensor:
        if self._eigen is None and self._inverses is None:
            self.refresh(damping)
        if self._inverses is not None:
            a_inverse, g_inverse = self._inverses
            return g_inverse @ grad @ a_inverse
        assert self._eigen is not None, "precondition() before any statistics"
        a_values, a_vectors, g_values, g_vectors = self._eigen
        return eigenbasis_solve(
            grad, g_vectors, a_vectors, torch.outer(g_values, a_values), damping
        )

    def _damped_eigen(self, damping: float) -> tuple[Tensor, Tensor, Tensor]:
        """``(Q_G, Q_A, S)`` with ``S`` the eigenvalues of the matrix :meth:`precondition`
        inverts, ``(d_out, d_in)``, from the decompositions of the last :meth:`refresh`."""
        if self._eigen is None and self._inverses is None:
            self.refresh(damping)
        if self._inverses is not None:
            # Factored damping: (G + γ_G I) ⊗ (A + γ_A I) from the inverses refresh()
            # stored, so that every power uses the same matrix as precondition().
            if self._inverse_eigen is None or self._inverse_eigen[0] is not self._inverses:
                a_inverse, g_inverse = self._inverses
                a_values, a_vectors = symmetric_eigh(a_inverse, self.float64_max_dim)
                g_values, g_vectors = symmetric_eigh(g_inverse, self.float64_max_dim)
                values = torch.outer(g_values, a_values).reciprocal_()
                self._inverse_eigen = (self._inverses, (g_vectors, a_vectors, values))
            return self._inverse_eigen[1]  # type: ignore[return-value]
        assert self._eigen is not None
        a_values, a_vectors, g_values, g_vectors = self._eigen
        return g_vectors, a_vectors, torch.outer(g_values, a_values) + damping

    def _matpower(self, v: Tensor, damping: float, power: float) -> Tensor:
        return eigenbasis_power(v, *self._damped_eigen(damping), power)

    def sample_matpower(self, damping: float, power: float) -> Tensor:
        g_vectors, a_vectors, eigenvalues = self._damped_eigen(damping)
        return eigenbasis_sample(g_vectors, a_vectors, eigenvalues, power)

    @property
    def inverses(self) -> tuple[Tensor, Tensor] | None:
        """``((A + γ_A I)⁻¹, (G + γ_G I)⁻¹)`` of the last :meth:`refresh` with the factored
        damping rule (``None`` before it, or with the exact rule)."""
        return self._inverses

    def damped_dense(self, damping: float) -> Tensor:
        if self.damping_rule == "exact":
            return super().damped_dense(damping)
        return factored_kronecker(*self.factors(), damping)

    # --- inspection and checkpoints ---------------------------------------------------
    def to_dense(self) -> Tensor:
        return torch.kron(*self.factors())

    def state_dict(self) -> dict[str, Tensor]:
        if not self.initialized:
            return {}
        assert self.a_factor is not None and self.g_factor is not None
        return {"a_factor": self.a_factor.clone(), "g_factor": self.g_factor.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.discard()
        self._eigen = self._inverses = None
        if not state:
            self.a_factor = self.g_factor = None
            return
        d_out, d_in = self.shape
        name = type(self).__name__
        a_factor = checked_state(state, "a_factor", (d_in, d_in), name)
        g_factor = checked_state(state, "g_factor", (d_out, d_out), name)
        self.a_factor, self.g_factor = a_factor, g_factor
