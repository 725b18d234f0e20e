"""EKFAC: K-FAC's eigenbasis with the diagonal rescaled by projected per-example gradients."""

from __future__ import annotations

from torch import Tensor

from ngrl.capture import squared_gradient_sum
from ngrl.curvature.base import (
    CurvatureBlock,
    PendingStatistics,
    blend,
    checked_state,
    eigenbasis_power,
    eigenbasis_sample,
    eigenbasis_solve,
    kronecker_dense,
    register,
    symmetric_eigh,
)
from ngrl.curvature.kfac import KFACBlock

__all__ = ["EKFACBlock"]


@register("ekfac")
class EKFACBlock(CurvatureBlock):
    """Eigenvalue-corrected K-FAC (George et al. 2018, arXiv:1806.03884).

    K-FAC's eigenbases ``Q_A``, ``Q_G`` (of ``A = E[Σ_t ā ā ᵀ]`` and ``G = E[(1/T) Σ_t g gᵀ]``)
    are kept, but the eigenvalues ``d_G d_Aᵀ`` are replaced by the second moments of the
    per-example gradients in that basis::

        S = E_n[(Q_Gᵀ ∇Ŵ_n Q_A)²],   F̂ = (Q_G ⊗ Q_A) diag(vec S) (Q_G ⊗ Q_A)ᵀ,

    the best diagonal approximation of the exact block in the Kronecker eigenbasis (so its
    Frobenius error is never above K-FAC's). Preconditioning is exact Tikhonov damping,
    ``X = Q_G [(Q_Gᵀ ∇Ŵ Q_A) / (S + λ)] Q_Aᵀ``.

    ``S`` is averaged with ``factor_decay`` in the current basis. The basis is recomputed
    from the running factors at each ``refresh`` (every ``inv_update_steps``); ``S`` is
    then carried into the new basis as the diagonal of the old approximation there, the
    best it can do without the old per-example gradients. The first batch sets the basis.

    ``A`` and ``G`` are K-FAC's statistics, kept by an inner :class:`KFACBlock`
    (:attr:`kfac`); the inverse is EKFAC's own (it uses neither K-FAC's eigenvalues nor
    its damping rule).

    Exact for dense and convolutional layers with ``weight_sharing="expand"`` (the
    per-example gradients ``Σ_t g_t ā_tᵀ`` are formed in the rotated basis).

    Args:
        shape: ``(d_out, d_in)`` of the combined parameter ``Ŵ = [W | b]``.
        float64_max_dim: factors up to this size are decomposed in float64.
    """

    state_keys = ("a_factor", "g_factor", "scalings", "a_basis", "g_basis")
    data_parallel = "local"  # the first batch picks the basis of S on each rank

    def __init__(self, shape: tuple[int, ...], *, float64_max_dim: int = 1024) -> None:
        #: K-FAC's running factors, for their eigenbases (K-FAC's statistics, not its inverse).
        self.kfac = KFACBlock(shape, float64_max_dim=float64_max_dim)
        self.shape = self.kfac.shape
        self.float64_max_dim = float64_max_dim
        self.scalings: Tensor | None = None
        self._basis: tuple[Tensor, Tensor] | None = None  # (Q_G, Q_A)
        self._pending = PendingStatistics()

    # --- statistics -------------------------------------------------------------------
    def accumulate(self, a: Tensor | None, g: Tensor) -> None:
        self.kfac.accumulate(a, g)
        self._pending.add(a, g, "EKFAC")

    def pending_is_finite(self) -> bool:
        return self._pending.is_finite()

    def commit(self, factor_decay: float) -> None:
        batch = self._pending.batch()
        if batch is None:
            return
        a, g = batch
        self.kfac.commit(factor_decay)  # running A and G
        if self._basis is None:
            self._basis = self._eigenbasis()
        g_basis, a_basis = self._basis
        second_moments = squared_gradient_sum(a @ a_basis, g @ g_basis) / a.shape[0]
        self.scalings = blend(self.scalings, second_moments, factor_decay)
        self._pending.clear()

    def discard(self) -> None:
        self.kfac.discard()
        self._pending.clear()

    @property
    def initialized(self) -> bool:
        return self.scalings is not None

    # --- inverse ----------------------------------------------------------------------
    def _eigenbasis(self) -> tuple[Tensor, Tensor]:
        g_factor, a_factor = self.kfac.factors()
        _, a_basis = symmetric_eigh(a_factor, self.float64_max_dim)
        _, g_basis = symmetric_eigh(g_factor, self.float64_max_dim)
        return g_basis, a_basis

    def refresh(self, damping: float) -> None:
        """New eigenbasis from the running factors; ``S`` carried over as
        ``diag((P_G ⊗ P_A) diag(S) (P_G ⊗ P_A)ᵀ)`` with ``P = Q_newᵀ Q_old``."""
        if not self.initialized:
            return
        assert self._basis is not None and self.scalings is not None
        old_g, old_a = self._basis
        new_g, new_a = self._eigenbasis()
        carry_g = (new_g.T @ old_g).square()
        carry_a = (new_a.T @ old_a).square()
        self.scalings = carry_g @ self.scalings @ carry_a.T
        self._basis = (new_g, new_a)

    def _damped_eigen(self, damping: float) -> tuple[Tensor, Tensor, Tensor]:
        assert self._basis is not None and self.scalings is not None, (
            "EKFAC used before any statistics"
        )
        g_basis, a_basis = self._basis
        return g_basis, a_basis, self.scalings + damping

    def precondition(self, grad: Tensor, damping: float) -> Tensor:
        assert self._basis is not None and self.scalings is not None, (
            "precondition() before any statistics"
        )
        g_basis, a_basis = self._basis
        return eigenbasis_solve(grad, g_basis, a_basis, self.scalings, damping)

    def _matpower(self, v: Tensor, damping: float, power: float) -> Tensor:
        return eigenbasis_power(v, *self._damped_eigen(damping), power)

    def sample_matpower(self, damping: float, power: float) -> Tensor:
        return eigenbasis_sample(*self._damped_eigen(damping), power)

    # --- inspection and checkpoints ---------------------------------------------------
    def to_dense(self) -> Tensor:
        assert self._basis is not None and self.scalings is not None
        g_basis, a_basis = self._basis
        return kronecker_dense(g_basis, a_basis, self.scalings)

    def state_dict(self) -> dict[str, Tensor]:
        state = self.kfac.state_dict()
        if state:
            assert self._basis is not None and self.scalings is not None
            state.update(
                scalings=self.scalings.clone(),
                g_basis=self._basis[0].clone(),
                a_basis=self._basis[1].clone(),
            )
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        name = type(self).__name__
        d_out, d_in = self.shape
        if state:
            scalings = checked_state(state, "scalings", (d_out, d_in), name)
            basis = (
                checked_state(state, "g_basis", (d_out, d_out), name),
                checked_state(state, "a_basis", (d_in, d_in), name),
            )
        self.kfac.load_state_dict({k: v for k, v in state.items() if k in KFACBlock.state_keys})
        self._pending.clear()
        if state:
            self.scalings, self._basis = scalings, basis
        else:
            self.scalings = self._basis = None
