"""M-FAC: the damped empirical Fisher of a sliding window of gradients, inverted matrix-free."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ngrl.capture import example_gradients
from ngrl.curvature.base import (
    ExampleStatisticsBlock,
    checked_state,
    jittered_cholesky,
    register,
    symmetric_eigh,
)

__all__ = ["MFACBlock"]


@register("mfac")
class MFACBlock(ExampleStatisticsBlock):
    """Dynamic M-FAC (Frantar, Kurtic & Alistarh 2021, arXiv:2107.03356), per layer.

    The block keeps the last ``m = window`` per-example gradients ``∇ℓ_i`` of the
    captured passes (a ring buffer ``Γ``, ``k ≤ m`` rows filled) and their Gram matrix
    ``ΓΓᵀ``, and approximates the Fisher by their empirical second moment::

        F̂ = (1/k) Σ_i ∇ℓ_i ∇ℓ_iᵀ = Γᵀ Γ / k,
        (F̂ + λI)⁻¹ v = (v − Γᵀ (kλ I + ΓΓᵀ)⁻¹ Γ v) / λ        (Woodbury).

    A product costs ``O(dm + m²)`` given the Cholesky factor of ``kλI + ΓΓᵀ``; adding
    ``b`` gradients costs ``O(dmb)`` for the Gram rows plus ``O(m³)`` for the new
    factor. The window replaces the exponential average: ``factor_decay`` is not used.
    A captured batch larger than the window contributes its last ``m`` examples.

    Args:
        shape: ``(d_out, d_in)`` of the layer's combined parameter ``Ŵ = [W | b]``.
        window: ``m``, the number of gradients kept.
    """

    state_keys = ("window", "cursor")
    data_parallel = "local"  # a window of examples, not an average
    name = "M-FAC"

    def __init__(self, shape: tuple[int, ...], *, window: int = 32) -> None:
        if not (isinstance(window, int) and window >= 1):
            raise ValueError(f"Invalid window: {window!r} (a number of gradients >= 1)")
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.numel = math.prod(self.shape)
        self.window = window
        self.gradients: Tensor | None = None  # (m, d) ring buffer
        self.gram: Tensor | None = None
        self.filled = 0
        self.cursor = 0
        self._cholesky: tuple[float, Tensor | None] | None = None

    # --- statistics -------------------------------------------------------------------
    def commit(self, factor_decay: float) -> None:
        batch = self._pending.batch()
        if batch is None:
            return
        a, g = batch
        rows = example_gradients(a[-self.window :], g[-self.window :]).flatten(1)
        if rows.shape[1] != self.numel:
            raise ValueError(
                f"M-FAC block of {self.numel} entries got gradients of {rows.shape[1]}"
            )
        self.discard()
        if self.gradients is None:
            self.gradients = rows.new_zeros(self.window, self.numel)
            self.gram = rows.new_zeros(self.window, self.window)
        assert self.gram is not None
        slots = (self.cursor + torch.arange(rows.shape[0])) % self.window
        self.gradients[slots] = rows
        self.cursor = int((self.cursor + rows.shape[0]) % self.window)
        self.filled = min(self.window, self.filled + rows.shape[0])
        products = rows @ self.gradients.T  # the new rows of the Gram matrix
        self.gram[slots] = products
        self.gram[:, slots] = products.T
        self._cholesky = None

    @property
    def initialized(self) -> bool:
        return self.filled > 0

    # --- inverse ----------------------------------------------------------------------
    def _filled(self) -> tuple[Tensor, Tensor]:
        assert self.gradients is not None and self.gram is not None
        k = self.filled
        return self.gradients[:k], self.gram[:k, :k]

    def refresh(self, damping: float) -> None:
        """Cholesky factor of ``kλI + ΓΓᵀ`` (also recomputed whenever the window moves).

        If it cannot be factored even with jitter, the factor is ``None`` and
        :meth:`precondition` returns NaN, so the optimizer skips the step with its warning.
        """
        if not self.initialized:
            return
        _, gram = self._filled()
        inner = gram.double().clone()
        inner.diagonal().add_(self.filled * damping)
        self._cholesky = (damping, jittered_cholesky(inner))

    def precondition(self, grad: Tensor, damping: float) -> Tensor:
        assert self.initialized, "precondition() before any statistics"
        if self._cholesky is None or self._cholesky[0] != damping:
            self.refresh(damping)
        assert self._cholesky is not None
        if self._cholesky[1] is None:
            return torch.full_like(grad, float("nan"))
        gradients, _ = self._filled()
        v = grad.reshape(-1)
        coefficients = torch.cholesky_solve((gradients @ v).double()[:, None], self._cholesky[1])
        x = (v - gradients.T @ coefficients[:, 0].to(v.dtype)) / damping
        return x.reshape(grad.shape)

    def _matpower(self, v: Tensor, damping: float, power: float) -> Tensor:
        """Any power, from the window's Gram matrix: with ``ΓΓᵀ/k = W diag(σ) Wᵀ`` the rows
        of ``U = diag(σ)^{-½} Wᵀ Γ / √k`` are orthonormal and ``F̂ = Uᵀ diag(σ) U``, so
        ``(F̂ + λI)^p v = λ^p v + Uᵀ [((σ + λ)^p − λ^p) · U v]``."""
        gradients, gram = self._filled()
        values, vectors = symmetric_eigh(gram / self.filled)
        keep = values > values.max() * 1e-12  # the window's rank
        values, vectors = values[keep], vectors[:, keep]
        basis = (vectors / (values * self.filled).sqrt()).T @ gradients
        flat = v.reshape(-1)
        change = ((values + damping).pow(power) - damping**power) * (basis @ flat)
        return (damping**power * flat + basis.T @ change).reshape(v.shape)

    # --- inspection and checkpoints ---------------------------------------------------
    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"window": (self.filled, self.numel), "cursor": ()}

    def to_dense(self) -> Tensor:
        gradients, _ = self._filled()
        return gradients.T @ gradients / self.filled

    def state_dict(self) -> dict[str, Tensor]:
        if not self.initialized:
            return {}
        gradients, _ = self._filled()
        return {"window": gradients.clone(), "cursor": torch.tensor(self.cursor)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.discard()
        self._cholesky = None
        if not state:
            self.gradients = self.gram = None
            self.filled = self.cursor = 0
            return
        rows = state.get("window")
        if rows is None or rows.dim() != 2 or not 1 <= rows.shape[0] <= self.window:
            raise ValueError(
                f"M-FAC checkpoint window does not fit a window of {self.window} gradients"
            )
        rows = checked_state(state, "window", (rows.shape[0], self.numel), "M-FAC")
        cursor = int(checked_state(state, "cursor", (), "M-FAC"))
        if not 0 <= cursor < self.window:
            raise ValueError(f"M-FAC checkpoint cursor {cursor} is outside the window")
        self.gradients = rows.new_zeros(self.window, self.numel)
        self.gradients[: rows.shape[0]] = rows
        self.gram = rows.new_zeros(self.window, self.window)
        self.gram[: rows.shape[0], : rows.shape[0]] = rows @ rows.T
        self.filled, self.cursor = rows.shape[0], cursor
