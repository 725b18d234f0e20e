"""Shampoo: left and right preconditioners from the gradient's row and column second moments."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ngrl.capture import example_gradients, squared_gradient_sum
from ngrl.curvature.base import (
    ExampleStatisticsBlock,
    blend,
    eigenbasis_power,
    eigenbasis_solve,
    kronecker_dense,
    matrix_shape,
    register,
    symmetric_eigh,
)

__all__ = ["ShampooBlock"]

Grafting = Literal["none", "sgd", "adam"]

#: Eigenvalues below this fraction of the largest are taken as zero before the power.
ROUNDING_LEVEL = 1e-12


@register("shampoo")
class ShampooBlock(ExampleStatisticsBlock):
    """Shampoo (Gupta, Koren & Singer 2018, arXiv:1802.09568) on Fisher statistics.

    With the per-example gradients ``∇Ŵ_n`` (``d_out × d_in``) of the captured passes::

        L = E_n[∇Ŵ_n ∇Ŵ_nᵀ],   R = E_n[∇Ŵ_nᵀ ∇Ŵ_n],   F̂ = L^p ⊗ R^p,
        X = Q_L [(Q_Lᵀ ∇Ŵ Q_R) / (l^p r^pᵀ + λ)] Q_Rᵀ,

    with ``p = exponent``: ``p = 1/4`` (default) is the paper's ``L^{-1/4} ∇ R^{-1/4}``
    for matrices, ``p = 1/2`` the square-root form whose square approximates the Fisher
    (Morwani et al. 2024). Two departures from the paper, both to fit ngrl's optimizer:
    the statistics are exponential averages (``factor_decay``) of per-example Fisher
    statistics rather than sums of minibatch gradients, and damping is exact Tikhonov
    damping of the product rather than ``ε`` added to each factor.

    ``grafting`` keeps Shampoo's direction but takes each layer's step norm from another
    method: ``"sgd"`` (``‖∇Ŵ‖``) or ``"adam"`` (``‖∇Ŵ / (√v + ε)‖`` with ``v = E_n[∇Ŵ_n²]``,
    Adam's second moment from the same statistics); ``"none"`` (default) leaves it.

    Args:
        shape: ``(d_out, d_in)`` of the combined parameter ``Ŵ = [W | b]``.
        exponent: ``p`` above, in ``(0, 1]``.
        grafting: ``"none"``, ``"sgd"`` or ``"adam"``.
        graft_epsilon: ``ε`` of Adam grafting.
        float64_max_dim: factors up to this size are decomposed in float64.
    """

    state_keys = ("left", "right", "second_moment")
    derived_keys = ("_eigen",)
    name = "Shampoo"

    def __init__(
        self,
        shape: tuple[int, ...],
        *,
        exponent: float = 0.25,
        grafting: Grafting = "none",
        graft_epsilon: float = 1e-8,
        float64_max_dim: int = 1024,
    ) -> None:
        shape = matrix_shape(shape, "Shampoo")
        if not 0.0 < exponent <= 1.0:
            raise ValueError(f"Invalid exponent: {exponent!r} (must be in (0, 1])")
        if grafting not in ("none", "sgd", "adam"):
            raise ValueError(f"Invalid grafting: {grafting!r} (use 'none', 'sgd' or 'adam')")
        super().__init__()
        self.shape = shape
        self.exponent = exponent
        self.grafting = grafting
        self.graft_epsilon = graft_epsilon
        self.float64_max_dim = float64_max_dim
        self.left: Tensor | None = None
        self.right: Tensor | None = None
        self.second_moment: Tensor | None = None
        self._eigen: tuple[Tensor, Tensor, Tensor] | None = None  # (Q_L, Q_R, l^p r^pᵀ)

    # --- statistics -------------------------------------------------------------------
    def commit(self, factor_decay: float) -> None:
        batch = self._pending.batch()
        if batch is None:
            return
        a, g = batch
        n = a.shape[0]
        if a.shape[1] == 1:  # ∇Ŵ_n = g_n ā_nᵀ: weighted outer products, no per-example tensor
            a1, g1 = a[:, 0], g[:, 0]
            left = (g1 * a1.square().sum(1, keepdim=True)).T @ g1 / n
            right = (a1 * g1.square().sum(1, keepdim=True)).T @ a1 / n
            moment = squared_gradient_sum(a, g) / n
        else:  # one per-example tensor serves all three statistics
            grads = example_gradients(a, g)
            left = torch.einsum("noi,npi->op", grads, grads) / n
            right = torch.einsum("noi,noj->ij", grads, grads) / n
            moment = grads.square().mean(0)
        self.left = blend(self.left, left, factor_decay)
        self.right = blend(self.right, right, factor_decay)
        self.second_moment = blend(self.second_moment, moment, factor_decay)
        self.discard()

    @property
    def initialized(self) -> bool:
        return self.left is not None

    # --- inverse ----------------------------------------------------------------------
    def _decompose(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(Q_L, Q_R, l^p r^pᵀ)`` of the current statistics."""
        assert self.left is not None and self.right is not None
        l_values, l_vectors = symmetric_eigh(self.left, self.float64_max_dim)
        r_values, r_vectors = symmetric_eigh(self.right, self.float64_max_dim)
        scale = torch.outer(self._power(l_values), self._power(r_values))
        return l_vectors, r_vectors, scale

    def _power(self, values: Tensor) -> Tensor:
        # Eigenvalues at rounding level count as zero: their p-th roots (1e-17^¼ ≈ 6e-5)
        # would be noise, e.g. for the output layer of a softmax, whose G is singular.
        floor = ROUNDING_LEVEL * float(values.max())
        return torch.where(values > floor, values, torch.zeros_like(values)).pow(self.exponent)

    def refresh(self, damping: float) -> None:
        if self.initialized:
            self._eigen = self._decompose()

    def precondition(self, grad: Tensor, damping: float) -> Tensor:
        if self._eigen is None:
            self.refresh(damping)
        assert self._eigen is not None, "precondition() before any statistics"
        l_vectors, r_vectors, scale = self._eigen
        x = eigenbasis_solve(grad, l_vectors, r_vectors, scale, damping)
        if self.grafting == "none":
            return x
        if self.grafting == "sgd":
            target = grad.norm()
        else:
            assert self.second_moment is not None
            target = (grad / (self.second_moment.sqrt() + self.graft_epsilon)).norm()
        norm = x.norm()
        return x * (target / norm) if float(norm) > 0.0 else x

    def _matpower(self, v: Tensor, damping: float, power: float) -> Tensor:
        if self.grafting != "none":  # a grafted step is not a matrix product
            return super()._matpower(v, damping, power)
        if self._eigen is None:
            self.refresh(damping)
        assert self._eigen is not None
        l_vectors, r_vectors, scale = self._eigen
        return eigenbasis_power(v, l_vectors, r_vectors, scale + damping, power)

    # --- inspection and checkpoints ---------------------------------------------------
    def to_dense(self) -> Tensor:
        return kronecker_dense(*self._decompose())

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        d_out, d_in = self.shape
        return {"left": (d_out, d_out), "right": (d_in, d_in), "second_moment": (d_out, d_in)}

    def forget_derived(self) -> None:
        self._eigen = None
