"""The diagonal Fisher block: per-parameter second moments of per-example gradients."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ngrl.capture import squared_gradient_sum
from ngrl.curvature.base import CurvatureBlock, blend, register
from ngrl.linalg import all_finite

__all__ = ["DiagonalBlock"]


@register("diag")
class DiagonalBlock(CurvatureBlock):
    """Diagonal Fisher ``F ≈ diag(E_n[∇ℓ_n ⊙ ∇ℓ_n])``, preconditioning ``X = ∇ / (d + λ)``.

    The diagonal of the Fisher (the squared-gradient statistic of Amari's natural gradient
    in its cheapest form; the curvature of VOGN/Vadam, Khan et al. 2018). It accepts two
    kinds of statistics:

    * ``a`` and ``g`` of a dense or convolutional layer: the per-example gradient
      ``∇Ŵ_n = Σ_t g_{n,t} ā_{n,t}ᵀ`` is formed exactly and squared;
    * ``a=None`` and ``g`` of shape ``(S, P)``: ``S`` samples of flattened gradients whose
      second moment is the Fisher, used for layers the capture has no rule for (the
      optimizer passes ``sqrt(N)·∇L`` of a sampled-target loss, an unbiased estimate).

    Args:
        shape: shape of the gradient this block preconditions (any shape).
    """

    state_keys = ("diagonal",)

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.numel = math.prod(self.shape)
        self.diagonal: Tensor | None = None
        self._sum: Tensor | None = None
        self._count = 0

    def accumulate(self, a: Tensor | None, g: Tensor) -> None:
        if a is not None:
            total = squared_gradient_sum(a, g).reshape(-1)
        else:
            samples = g.reshape(g.shape[0], -1)
            total = samples.square().sum(0)
        if total.shape[0] != self.numel:
            raise ValueError(
                f"diagonal block of {self.numel} entries got gradients of {total.shape[0]}"
            )
        self._sum = total if self._sum is None else self._sum.add_(total)
        self._count += g.shape[0]

    def pending_is_finite(self) -> bool:
        return self._sum is None or all_finite(self._sum)

    def commit(self, factor_decay: float) -> None:
        if self._sum is None:
            return
        self.diagonal = blend(self.diagonal, self._sum / self._count, factor_decay)
        self.discard()

    def discard(self) -> None:
        self._sum = None
        self._count = 0

    @property
    def initialized(self) -> bool:
        return self.diagonal is not None

    def refresh(self, damping: float) -> None:
        """Nothing to derive: preconditioning divides by ``diagonal + damping`` directly."""

    def precondition(self, grad: Tensor, damping: float) -> Tensor:
        assert self.diagonal is not None, "precondition() before any statistics"
        return grad / (self.diagonal.reshape(grad.shape) + damping)

    def _matpower(self, v: Tensor, damping: float, power: float) -> Tensor:
        assert self.diagonal is not None
        return v * (self.diagonal.reshape(v.shape) + damping).pow(power)

    def to_dense(self) -> Tensor:
        assert self.diagonal is not None
        return torch.diag(self.diagonal)

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.diagonal is None else {"diagonal": self.diagonal.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.discard()
        if not state:
            self.diagonal = None
            return
        diagonal = state["diagonal"]
        if diagonal.numel() != self.numel:
            raise ValueError(
                f"a diagonal of {diagonal.numel()} entries does not fit {self.numel} parameters"
            )
        if not torch.isfinite(diagonal).all():
            raise ValueError("the diagonal Fisher in the checkpoint is not finite")
        self.diagonal = diagonal.reshape(-1).clone()
