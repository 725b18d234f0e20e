"""The exact Fisher block of a small layer, dense."""

from __future__ import annotations

import math

from torch import Tensor

from ngrl.capture import example_gradients
from ngrl.curvature.base import CurvatureBlock, blend, checked_state, symmetric_eigh
from ngrl.linalg import all_finite

__all__ = ["DenseBlock"]


class DenseBlock(CurvatureBlock):
    """``F = E_n[∇ℓ_n ∇ℓ_nᵀ]`` over a layer's ``P`` parameters, dense, with
    ``X = (F + λI)⁻¹ ∇`` exact through the eigendecomposition ``F = Q diag(s) Qᵀ`` of the
    last refresh: ``X = Q ((Qᵀ∇) / (s + λ))``, and any matrix power the same way.

    For layers of at most a few thousand parameters: K-FAC gives it the affine part
    ``(γ, β)`` of normalisation layers (kfac-jax's full scale-and-shift block), whose
    per-example gradients the capture hands over as rows (``a=None``, ``g`` of shape
    ``(N, P)``); dense and convolutional statistics ``(a, g)`` are turned into
    per-example gradients first.

    Args:
        shape: shape of the gradient this block preconditions (any shape).
    """

    state_keys = ("fisher",)
    derived_keys = ("_eigen",)

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.numel = math.prod(self.shape)
        self.fisher: Tensor | None = None
        self._eigen: tuple[Tensor, Tensor] | None = None
        self.discard()

    def accumulate(self, a: Tensor | None, g: Tensor) -> None:
        rows = (g if a is None else example_gradients(a, g)).reshape(g.shape[0], -1)
        if rows.shape[1] != self.numel:
            raise ValueError(
                f"dense block of {self.numel} entries got gradients of {rows.shape[1]}"
            )
        total = rows.T @ rows
        self._sum = total if self._sum is None else self._sum.add_(total)
        self._count += rows.shape[0]

    def pending_is_finite(self) -> bool:
        return self._sum is None or all_finite(self._sum)

    def commit(self, factor_decay: float) -> None:
        if self._sum is None:
            return
        self.fisher = blend(self.fisher, self._sum / self._count, factor_decay)
        self.discard()

    def discard(self) -> None:
        self._sum: Tensor | None = None
        self._count = 0

    @property
    def initialized(self) -> bool:
        return self.fisher is not None

    def refresh(self, damping: float) -> None:
        if self.fisher is not None:
            self._eigen = symmetric_eigh(self.fisher)

    def precondition(self, grad: Tensor, damping: float) -> Tensor:
        return self._matpower(grad, damping, -1.0)

    def _matpower(self, v: Tensor, damping: float, power: float) -> Tensor:
        if self._eigen is None:
            self.refresh(damping)
        assert self._eigen is not None, "precondition() before any statistics"
        values, vectors = self._eigen
        rotated = vectors.T @ v.reshape(-1)
        return (vectors @ (rotated * (values + damping).pow(power))).reshape(v.shape)

    def to_dense(self) -> Tensor:
        assert self.fisher is not None
        return self.fisher

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.fisher is None else {"fisher": self.fisher.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.discard()
        self._eigen = None
        if not state:
            self.fisher = None
            return
        self.fisher = checked_state(state, "fisher", (self.numel, self.numel), "DenseBlock")
