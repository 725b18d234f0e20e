"""Small numerical routines shared by the curvature blocks and the optimizers (torch only)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["MatVec", "all_finite", "conjugate_gradient", "flatten_like"]

MatVec = Callable[[Tensor], Tensor]


def flatten_like(tensors: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    """One flat vector of ``tensors`` shaped like ``params``, a ``None`` counting as
    zeros (a parameter that received no gradient)."""
    return torch.cat(
        [
            torch.zeros_like(p).reshape(-1) if t is None else t.reshape(-1)
            for t, p in zip(tensors, params, strict=True)
        ]
    )


def all_finite(*tensors: Tensor) -> bool:
    """Whether every entry of every tensor is finite.

    A finite sum proves it (an infinity or a NaN anywhere makes the sum infinite or NaN),
    and costs a reduction instead of an elementwise mask; only a sum that is not finite,
    which a sum of large finite entries can also be, takes the elementwise check.
    """
    return all(bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()) for t in tensors)


def conjugate_gradient(
    matvec: MatVec,
    b: Tensor,
    max_iterations: int = 10,
    tolerance: float = 1e-10,
    preconditioner: MatVec | None = None,
) -> Tensor:
    """Approximate ``A⁻¹ b`` for a symmetric positive-definite ``A`` given as ``matvec``.

    Hestenes & Stiefel (1952), started from zero; stops after ``max_iterations`` products
    or when the squared residual falls below ``tolerance``. With ``max_iterations`` at
    least the dimension it is exact up to rounding. ``preconditioner`` applies ``M⁻¹`` for
    an SPD ``M ≈ A`` (preconditioned CG: the same iterates in the metric of ``M``).
    Stops early, keeping the iterate so far, if a direction of non-positive curvature
    shows that ``A`` is not positive definite.
    """
    x = torch.zeros_like(b)
    residual = b.clone()
    z = residual if preconditioner is None else preconditioner(residual)
    direction = z.clone()
    rz = residual @ z
    for _ in range(max_iterations):
        if residual @ residual <= tolerance:
            break
        a_direction = matvec(direction)
        curvature = direction @ a_direction
        if not curvature > 0:
            break
        alpha = rz / curvature
        x += alpha * direction
        residual -= alpha * a_direction
        z = residual if preconditioner is None else preconditioner(residual)
        new_rz = residual @ z
        direction = z + (new_rz / rz) * direction
        rz = new_rz
    return x
