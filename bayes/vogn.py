"""VOGN: variational online Gauss-Newton, a diagonal Gaussian posterior."""

from __future__ import annotations

import torch
from torch import Tensor

from ngrl.bayes.diagonal import DiagonalVariational
from ngrl.capture import squared_gradient_sum
from ngrl.layers import Layer
from ngrl.linalg import all_finite

__all__ = ["VOGN"]


class VOGN(DiagonalVariational):
    r"""Variational Online Gauss-Newton (Khan et al. 2018, arXiv:1806.04854; Osawa et al.
    2019, arXiv:1906.02506): a mean-field Gaussian whose precision is the Gauss-Newton
    diagonal from per-example squared gradients.

    With ``N = dataset_size / kl_weight``, ``λ̃ = prior_precision / N``, per step over the
    MC samples ``θ ~ q`` taken since the last step and the ``B`` examples of each:

    .. code-block:: text

        ĝ = mean ∇ℓ̄(θ),   ĥ = mean_samples (1/B) Σ_n (∇ℓ_n(θ))²
        m ← (1 − w₁)·m + w₁·(ĝ + λ̃μ)          w_i = (1 − β_i)/(1 − β_iᵗ): bias-corrected
        s ← (1 − w₂)·s + w₂·ĥ                   averages (Adam's debiasing)
        μ ← μ − lr · m / (s + λ̃)
        σ² = 1 / (N·s + prior_precision)

    The squared per-example gradients come from ngrl's capture hooks: ``Σ_n (g_n²)(ā_n²)ᵀ``
    for dense layers, one matrix product and no per-example tensor. At a fixed point ``μ``
    is the MAP estimate (for a narrow posterior) and the precision is
    ``prior_precision + N·mean_n(∇ℓ_n(μ)²)``. Arguments: see
    :class:`ngrl.bayes.diagonal.DiagonalVariational`; the model may hold ``nn.Linear`` and
    ``nn.Conv1d``/``2d``/``3d`` layers only.
    """

    def _record(self, layer: Layer, a: Tensor | None, g: Tensor) -> None:
        assert a is not None
        squares = squared_gradient_sum(a, g)
        previous = self._squares.get(layer.name)
        self._squares[layer.name] = squares if previous is None else previous.add_(squares)
        self._examples[layer.name] = self._examples.get(layer.name, 0) + a.shape[0]

    def _begin_sample(self) -> None:
        self._squares: dict[str, Tensor] = {}
        self._examples: dict[str, int] = {}

    def _discard_sample(self) -> None:
        self._begin_sample()

    def _end_sample(self, grad: Tensor) -> None:
        # Added layer by layer into the flat sum's parameter views: no flat temporary.
        if self._hessian_sum is None:
            self._hessian_sum = torch.zeros_like(grad)
        parts = self._param_parts(self._hessian_sum)
        for layer in self.layers:
            squares = self._squares.get(layer.name)
            if squares is None:
                continue
            pieces = layer.scatter(squares.div_(self._examples[layer.name]))
            for param, piece in zip(layer.params, pieces, strict=True):
                parts[id(param)].add_(piece)
        self._begin_sample()

    def _reset_samples(self) -> None:
        super()._reset_samples()
        self._hessian_sum: Tensor | None = None

    def _statistics_finite(self) -> bool:
        return self._hessian_sum is None or all_finite(self._hessian_sum)

    def _curvature_estimate(self, samples: int) -> Tensor:
        assert self._hessian_sum is not None
        return self._hessian_sum if samples == 1 else self._hessian_sum / samples

    def _mean_preconditioner(self, hessian: Tensor) -> Tensor:
        return hessian + self.prior_damping
