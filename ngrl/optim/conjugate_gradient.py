"""Conjugate gradient on Fisher-vector products, for natural policy gradient and TRPO."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ngrl.linalg import MatVec, conjugate_gradient, flatten_like

__all__ = ["conjugate_gradient", "fisher_vector_product", "flat_grad"]


def flat_grad(
    output: Tensor,
    params: Sequence[Tensor],
    *,
    retain_graph: bool | None = None,
    create_graph: bool = False,
) -> Tensor:
    """``∂output/∂params`` as one flat vector (zeros for parameters it does not reach)."""
    grads = torch.autograd.grad(
        output, params, retain_graph=retain_graph, create_graph=create_graph, allow_unused=True
    )
    return flatten_like(grads, params)


def fisher_vector_product(kl: Tensor, params: Sequence[Tensor], damping: float = 0.0) -> MatVec:
    """``v ↦ (F + damping·I) v`` with ``F = ∇²KL`` by double backpropagation.

    ``kl`` is the mean ``KL(π_old ‖ π_θ)`` with ``π_old`` a detached copy of the current
    policy: its Hessian at ``θ = θ_old`` is the Fisher information matrix (Schulman et
    al. 2015, TRPO, appendix C), and each product costs two backward passes, never the
    matrix itself.
    """
    grad_kl = flat_grad(kl, params, create_graph=True)

    def product(vector: Tensor) -> Tensor:
        hvp = flat_grad(grad_kl @ vector, params, retain_graph=True)
        return hvp + damping * vector if damping else hvp

    return product
