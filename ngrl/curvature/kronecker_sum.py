"""Blocks that are a sum of two Kronecker products, inverted by simultaneous diagonalisation."""

from __future__ import annotations

from abc import abstractmethod
from typing import Literal

import torch
from torch import Tensor

from ngrl.curvature.base import (
    ExampleStatisticsBlock,
    blend,
    factored_kronecker,
    matrix_shape,
    pi_split,
    symmetric_eigh,
)
from ngrl.curvature.kpsvd import check_power_iteration_options
from ngrl.linalg import conjugate_gradient

__all__ = ["KroneckerSumBlock", "random_symmetric"]

#: Smallest eigenvalue kept in the jointly diagonal form, where the damped first term is
#: the identity: a correction fitted on one batch is not trusted to remove more than 90%
#: of the first term's curvature in any direction (nor to make the sum indefinite). With
#: 1e-3 instead, KFAC-corrected turned unstable late in 2 of 3 benchmark seeds
#: (docs/benchmarks.md).
EIGENVALUE_FLOOR = 0.1


def random_symmetric(size: int, like: Tensor, seed: int = 0) -> Tensor:
    """A fixed pseudo-random symmetric matrix: a power-iteration start with no structure."""
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(size, size, generator=generator, dtype=torch.float64)
    return (matrix + matrix.T).to(dtype=like.dtype, device=like.device)


class KroneckerSumBlock(ExampleStatisticsBlock):
    """``F̂ = G ⊗ A + G₂ ⊗ A₂``: a Kronecker product and a Kronecker correction.

    Koroko et al. 2022 (arXiv:2201.10285), §4. Subclasses say where the two terms come
    from (:meth:`batch_terms`); this class averages them over batches (``factor_decay``,
    each factor separately) and inverts their sum.

    **Damping.** ``damping_rule="factored"`` (the paper's rule, the default) damps the
    first term by factors, ``(G + γ_G I) ⊗ (A + γ_A I)`` with ``γ_A γ_G = λ`` (π split),
    and inverts the sum exactly by simultaneous diagonalisation: with
    ``P_G = (G + γ_G I)^{-½} U_G`` where ``U_G diag(μ) U_Gᵀ`` is the eigendecomposition
    of ``(G + γ_G I)^{-½} G₂ (G + γ_G I)^{-½}`` (and ``P_A``, ``ν`` likewise),

        X = P_G [(P_Gᵀ ∇Ŵ P_A) / (1 + μ νᵀ)] P_Aᵀ,

    four matrix products per step like K-FAC. ``damping_rule="exact"`` solves
    ``(F̂ + λI) vec(X) = vec(∇Ŵ)`` by conjugate gradient on Kronecker matrix-vector
    products, preconditioned by the factored solve (a few iterations when λ is small
    against the factors).

    **Indefiniteness.** Unlike K-FAC, the sum is not guaranteed PSD: the correction term
    is a best fit, not a covariance, and on small batches ``F̂`` has negative eigenvalues
    of the order of the correction. The factored rule clamps the jointly diagonal
    eigenvalues ``1 + μν`` at :data:`EIGENVALUE_FLOOR` = 0.1 (so its inverse stays SPD,
    every step is a descent direction, and no direction gets more than 10× the step the
    damped first term alone would give it); the exact rule's conjugate gradient stops at the
    first direction of negative curvature (falling back to the factored solve if that
    is the first one). Both invert the stated matrix exactly whenever it is positive
    definite.

    Args:
        shape: ``(d_out, d_in)`` of the combined parameter ``Ŵ = [W | b]``.
        damping_rule: ``"factored"`` (default) or ``"exact"``.
        power_iterations: most power-iteration rounds for each Kronecker term per batch
            (warm-started from the running terms; see :class:`KPSVDBlock`).
        tolerance: power-iteration stopping tolerance (see :func:`best_kronecker`).
        cg_iterations: most conjugate-gradient iterations of the exact rule.
        cg_tolerance: the exact rule stops when ``‖residual‖² ≤ cg_tolerance·‖∇Ŵ‖²``.
        float64_max_dim: factors up to this size are decomposed in float64.
    """

    state_keys = ("a_factor", "g_factor", "a_correction", "g_correction")
    derived_keys = ("_solver",)
    data_parallel = "local"  # power iterations are not linear in the batch
    name = "Kronecker sum"

    def __init__(
        self,
        shape: tuple[int, ...],
        *,
        damping_rule: Literal["factored", "exact"] = "factored",
        power_iterations: int = 3,
        tolerance: float = 1e-4,
        cg_iterations: int = 50,
        cg_tolerance: float = 1e-20,
        float64_max_dim: int = 1024,
    ) -> None:
        shape = matrix_shape(shape, self.name, damping_rule)
        check_power_iteration_options(power_iterations, tolerance)
        if cg_iterations < 1:
            raise ValueError(f"Invalid cg_iterations: {cg_iterations} (must be >= 1)")
        super().__init__()
        self.shape = shape
        self.damping_rule = damping_rule
        self.power_iterations = power_iterations
        self.tolerance = tolerance
        self.cg_iterations = cg_iterations
        self.cg_tolerance = cg_tolerance
        self.float64_max_dim = float64_max_dim
        self.g_factor: Tensor | None = None
        self.a_factor: Tensor | None = None
        self.g_correction: Tensor | None = None
        self.a_correction: Tensor | None = None
        self._solver: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    @abstractmethod
    def batch_terms(self, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(G, A, G₂, A₂)`` of one batch of statistics."""

    # --- statistics -------------------------------------------------------------------
    def pending_is_finite(self) -> bool:
        return self._pending.derived_is_finite(self.batch_terms)

    def commit(self, factor_decay: float) -> None:
        terms = self._pending.derived(self.batch_terms)
        if terms is None:
            return
        g1, a1, g2, a2 = terms
        self.g_factor = blend(self.g_factor, g1, factor_decay)
        self.a_factor = blend(self.a_factor, a1, factor_decay)
        self.g_correction = blend(self.g_correction, g2, factor_decay)
        self.a_correction = blend(self.a_correction, a2, factor_decay)
        self.discard()

    @property
    def initialized(self) -> bool:
        return self.a_factor is not None

    def terms(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        assert self.g_factor is not None and self.a_factor is not None
        assert self.g_correction is not None and self.a_correction is not None
        return self.g_factor, self.a_factor, self.g_correction, self.a_correction

    # --- inverse ----------------------------------------------------------------------
    def _joint_basis(self, first: Tensor, second: Tensor, damping: float) -> tuple[Tensor, Tensor]:
        """``(P, μ)`` with ``Pᵀ(first + damping·I)P = I`` and ``Pᵀ second P = diag(μ)``."""
        values, vectors = symmetric_eigh(first, self.float64_max_dim)
        inverse_root = vectors / (values + damping).sqrt()
        mu, rotation = symmetric_eigh(
            inverse_root.T @ second @ inverse_root, self.float64_max_dim, psd=False
        )
        return inverse_root @ rotation, mu

    def refresh(self, damping: float) -> None:
        if not self.initialized:
            return
        g1, a1, g2, a2 = self.terms()
        a_damping, g_damping = pi_split(a1, g1, damping)
        g_basis, mu = self._joint_basis(g1, g2, g_damping)
        a_basis, nu = self._joint_basis(a1, a2, a_damping)
        self._solver = (g_basis, mu, a_basis, nu)

    def _factored_solve(self, grad: Tensor) -> Tensor:
        assert self._solver is not None
        g_basis, mu, a_basis, nu = self._solver
        eigenvalues = torch.outer(mu, nu).add_(1.0).clamp_(min=EIGENVALUE_FLOOR)
        return g_basis @ ((g_basis.T @ grad @ a_basis) / eigenvalues) @ a_basis.T

    def precondition(self, grad: Tensor, damping: float) -> Tensor:
        if self._solver is None:
            self.refresh(damping)
        if self.damping_rule == "factored":
            return self._factored_solve(grad)
        g1, a1, g2, a2 = self.terms()
        shape = grad.shape

        def matvec(vector: Tensor) -> Tensor:
            x = vector.reshape(shape)
            return (g1 @ x @ a1 + g2 @ x @ a2 + damping * x).reshape(-1)

        def preconditioner(vector: Tensor) -> Tensor:
            return self._factored_solve(vector.reshape(shape)).reshape(-1)

        b = grad.reshape(-1)
        tolerance = self.cg_tolerance * float(b @ b)
        solution = conjugate_gradient(
            matvec, b, self.cg_iterations, tolerance, preconditioner=preconditioner
        )
        if not bool(solution.any()):  # negative curvature at once: F̂ + λI is indefinite
            return self._factored_solve(grad)
        return solution.reshape(shape)

    def _matpower(self, v: Tensor, damping: float, power: float) -> Tensor:
        """``+1`` only: a sum of two Kronecker products has no cheap exact root."""
        if power != 1.0:
            return super()._matpower(v, damping, power)
        g1, a1, g2, a2 = self.terms()
        if self.damping_rule == "exact":
            return g1 @ v @ a1 + g2 @ v @ a2 + damping * v
        a_damping, g_damping = pi_split(a1, g1, damping)
        first = (g1 @ v + g_damping * v) @ a1 + a_damping * (g1 @ v + g_damping * v)
        return first + g2 @ v @ a2

    # --- inspection and checkpoints ---------------------------------------------------
    def to_dense(self) -> Tensor:
        g1, a1, g2, a2 = self.terms()
        return torch.kron(g1, a1) + torch.kron(g2, a2)

    def damped_dense(self, damping: float) -> Tensor:
        if self.damping_rule == "exact":
            return super().damped_dense(damping)
        g1, a1, g2, a2 = self.terms()
        return factored_kronecker(g1, a1, damping) + torch.kron(g2, a2)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        d_out, d_in = self.shape
        return {
            "a_factor": (d_in, d_in),
            "g_factor": (d_out, d_out),
            "a_correction": (d_in, d_in),
            "g_correction": (d_out, d_out),
        }

    def forget_derived(self) -> None:
        self._solver = None
