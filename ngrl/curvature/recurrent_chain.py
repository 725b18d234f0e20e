"""K-FAC for a dense map shared by the time steps of a recurrent layer, with the steps'
contributions correlated as a chain (Martens, Ba & Johnson 2018)."""

from __future__ import annotations

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

__all__ = ["RecurrentChainBlock", "chain_sum"]


def chain_sum(x: Tensor, steps: int) -> Tensor:
    """``f(x) = Σ_{t,s<T} x^{|t−s|} = T + 2 Σ_{d=1}^{T−1} (T−d) xᵈ`` elementwise: how much
    the sum of ``T`` steps of a stationary chain with lag-one correlation ``x`` varies,
    relative to one step (Horner's rule, stable for every ``x``)."""
    total = torch.zeros_like(x)
    for lag in range(steps - 1, 0, -1):
        total = (total + (steps - lag)) * x
    return steps + 2 * total


class RecurrentChainBlock(CurvatureBlock):
    """Martens, Ba & Johnson 2018 (ICLR, "Kronecker-factored curvature approximations for
    recurrent neural networks"), their option 1: the per-step contributions
    ``w_t = vec(g_t ā_tᵀ)`` of a map shared by ``T`` time steps form a stationary chain
    whose lag-one transition is symmetric in whitened coordinates.

    From the moments of the inputs and output gradients at lag 0 and 1 (averages over
    examples and steps)::

        A₀ = E[ā_t ā_tᵀ],  A₁ = E[ā_t ā_{t+1}ᵀ],  G₀ = E[g_t g_tᵀ],  G₁ = E[g_t g_{t+1}ᵀ],

    and ``C₀ = G₀ ⊗ A₀``, the whitened transitions ``Ψ_A = A₀^{-½} sym(A₁) A₀^{-½} =
    U_A diag(ψ_A) U_Aᵀ`` (the same for ``G``) give ``E[w_t w_sᵀ] = C₀^{½} Ψ^{|t−s|} C₀^{½}``
    with ``Ψ = Ψ_G ⊗ Ψ_A``; summed over all pairs of steps::

        F̂ = C₀^{½} (U_G⊗U_A) diag f(ψ_G ψ_Aᵀ) (U_G⊗U_A)ᵀ C₀^{½},   f = :func:`chain_sum`,

    so ``X = K_G [(K_Gᵀ ∇Ŵ K_A) / f(ψ_G ψ_Aᵀ)] K_Aᵀ`` with ``K = C₀^{-½} U``. With
    ``ψ = 0`` this is ``T·G₀ ⊗ A₀``, K-FAC-expand over time. Damping is added to the
    factors before the whitening, ``A₀ + γ_A I`` and ``G₀ + γ_G I`` with ``γ_A γ_G = λ/T``
    split by their traces (at ``ψ = 0``: ``λ`` for the product), and ``f`` is kept at 1 or
    more: a sum of steps is never taken to vary less than one step (anticorrelated steps
    would otherwise leave a direction undamped). ``T`` is the number of steps of the last
    batch; a batch of single steps has no lag-one moments (``ψ = 0``).

    Args:
        shape: ``(d_out, d_in)`` of ``Ŵ = [W | b]``.
        float64_max_dim: factors up to this size are decomposed in float64.
    """

    state_keys = ("a_moments", "g_moments", "steps")
    derived_keys = ("_whitened",)
    #: Moments of the batch: their average over ranks is the union batch's.
    data_parallel = "share"

    def __init__(self, shape: tuple[int, ...], *, float64_max_dim: int = 1024) -> None:
        self.shape = matrix_shape(shape, "RecurrentChainBlock")
        self.float64_max_dim = float64_max_dim
        #: ``(2, d, d)``: the lag-0 and the (symmetrised) lag-1 moment of each side.
        self.a_moments: Tensor | None = None
        self.g_moments: Tensor | None = None
        #: ``T``, as a one-element tensor (so that checkpoints and ranks carry it).
        self.steps: Tensor | None = None
        self._whitened: tuple[Tensor, ...] | None = None
        self.discard()

    # --- statistics -------------------------------------------------------------------
    def accumulate(self, a: Tensor | None, g: Tensor) -> None:
        if a is None or a.dim() != 3:
            raise ValueError("RecurrentChainBlock needs the (N, T, d) inputs of every step")
        a_sums, g_sums = _lag_sums(a), _lag_sums(g)
        if self._a_sums is None or self._g_sums is None:
            self._a_sums, self._g_sums = a_sums, g_sums
        else:
            self._a_sums.add_(a_sums)
            self._g_sums.add_(g_sums)
        n, steps = a.shape[0], a.shape[1]
        self._pairs += torch.tensor([n * steps, n * (steps - 1)], dtype=a.dtype)
        self._steps = steps

    def pending_is_finite(self) -> bool:
        return self._a_sums is None or all_finite(self._a_sums, self._g_sums)

    def commit(self, factor_decay: float) -> None:
        if self._a_sums is None or self._g_sums is None:
            return
        counts = self._pairs.clamp(min=1).to(self._a_sums)[:, None, None]
        self.a_moments = blend(self.a_moments, self._a_sums / counts, factor_decay)
        self.g_moments = blend(self.g_moments, self._g_sums / counts, factor_decay)
        self.steps = torch.tensor([float(self._steps)], dtype=self._a_sums.dtype)
        self.discard()

    def discard(self) -> None:
        self._a_sums: Tensor | None = None
        self._g_sums: Tensor | None = None
        self._pairs = torch.zeros(2, dtype=torch.float64)
        self._steps = 0

    @property
    def initialized(self) -> bool:
        return self.a_moments is not None and self.g_moments is not None

    # --- inverse ----------------------------------------------------------------------
    def refresh(self, damping: float) -> None:
        if not self.initialized:
            return
        assert self.a_moments is not None and self.g_moments is not None
        steps = self._step_count()
        a_damping, g_damping = pi_split(self.a_moments[0], self.g_moments[0], damping / steps)
        a_root, a_basis, a_psi = self._whiten(self.a_moments, a_damping)
        g_root, g_basis, g_psi = self._whiten(self.g_moments, g_damping)
        gain = chain_sum(torch.outer(g_psi, a_psi), steps).clamp_(min=1.0)
        self._whitened = (g_root, g_basis, a_root, a_basis, gain)

    def _step_count(self) -> int:
        assert self.steps is not None
        return max(1, round(float(self.steps[0])))

    def _whiten(self, moments: Tensor, damping: float) -> tuple[Tensor, Tensor, Tensor]:
        """``(M₀^{½}, M₀^{-½} U, ψ)`` of one side, ``M₀`` damped, ``ψ`` clamped to
        ``[−1, 1]`` (a correlation)."""
        lag0 = moments[0] + damping * torch.eye(moments.shape[1], dtype=moments.dtype)
        values, vectors = symmetric_eigh(lag0, self.float64_max_dim)
        values = values.clamp(min=torch.finfo(values.dtype).tiny)
        inverse_root = (vectors * values.rsqrt()) @ vectors.T
        whitened = inverse_root @ moments[1] @ inverse_root
        psi, basis = symmetric_eigh(whitened, self.float64_max_dim, psd=False)
        root = (vectors * values.sqrt()) @ vectors.T
        return root, inverse_root @ basis, psi.clamp(-1.0, 1.0)

    def _parts(self, damping: float) -> tuple[Tensor, ...]:
        if self._whitened is None:
            self.refresh(damping)
        assert self._whitened is not None, "precondition() before any statistics"
        return self._whitened

    def precondition(self, grad: Tensor, damping: float) -> Tensor:
        _, g_basis, _, a_basis, gain = self._parts(damping)
        return g_basis @ ((g_basis.T @ grad @ a_basis) / gain) @ a_basis.T

    def damped_dense(self, damping: float) -> Tensor:
        """``F̂`` with the damped factors: the matrix :meth:`precondition` inverts (built
        with the decompositions of the last :meth:`refresh`)."""
        g_root, g_basis, a_root, a_basis, gain = self._parts(damping)
        # C₀^{½} U = C₀ K: the basis in the unwhitened coordinates.
        left = torch.kron(g_root @ g_root @ g_basis, a_root @ a_root @ a_basis)
        return (left * gain.reshape(-1)) @ left.T

    def to_dense(self) -> Tensor:
        whitened = self._whitened
        self.refresh(0.0)
        dense = self.damped_dense(0.0)
        self._whitened = whitened
        return dense

    # --- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        if not self.initialized:
            return {}
        assert self.a_moments is not None and self.g_moments is not None
        assert self.steps is not None
        return {
            "a_moments": self.a_moments.clone(),
            "g_moments": self.g_moments.clone(),
            "steps": self.steps.clone(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.discard()
        self._whitened = None
        if not state:
            self.a_moments = self.g_moments = self.steps = None
            return
        d_out, d_in = self.shape
        name = "RecurrentChainBlock"
        self.a_moments = checked_state(state, "a_moments", (2, d_in, d_in), name)
        self.g_moments = checked_state(state, "g_moments", (2, d_out, d_out), name)
        self.steps = checked_state(state, "steps", (1,), name)


def _lag_sums(x: Tensor) -> Tensor:
    """``(2, d, d)``: ``Σ_{n,t} x_t x_tᵀ`` and the symmetrised ``Σ_{n,t} x_t x_{t+1}ᵀ``."""
    flat = x.reshape(-1, x.shape[-1])
    lag0 = flat.T @ flat
    lag1 = torch.einsum("nti,ntj->ij", x[:, :-1], x[:, 1:])
    return torch.stack([lag0, 0.5 * (lag1 + lag1.T)])
