"""The brute-force Fisher of a small model: the oracle every approximation is tested against.

Everything here is exact and dense (``P × P`` for ``P`` parameters), built from per-example
gradients and Jacobians with ``torch.func``. It is meant for models of a few hundred
parameters in float64, never for training.

Parameter order: the concatenation of ``model.named_parameters()`` (trainable ones),
each flattened row-major. :func:`layer_indices` maps a layer to ngrl's block order
``Ŵ = [W | b]`` (row-major), so ``F[idx][:, idx]`` is comparable to ``block.to_dense()``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from ngrl.linalg import flatten_like

__all__ = [
    "empirical_fisher",
    "exact_fisher",
    "flat_gradient",
    "layer_indices",
    "output_jacobians",
    "per_example_gradients",
]

Likelihood = Literal["categorical", "gaussian"]


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _flatten(tree: dict[str, Tensor], batched: bool) -> Tensor:
    start = 1 if batched else 0
    return torch.cat([t.flatten(start) for t in tree.values()], dim=start)


def per_example_gradients(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
) -> Tensor:
    """``(N, P)``: row ``n`` is ``∇_θ loss_fn(model(x_n), y_n)`` for one example."""
    params = _params(model)

    def one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, p, (x[None],)), y[None])

    return _flatten(vmap(grad(one), in_dims=(None, 0, 0))(params, inputs, targets), True)


def empirical_fisher(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
) -> Tensor:
    """``E_n[∇ℓ_n ∇ℓ_nᵀ]`` for the given targets. With targets sampled from the model
    (see :func:`ngrl.fisher_loss`) this is the Monte-Carlo estimate of the true Fisher that
    K-FAC's statistics are built from."""
    grads = per_example_gradients(model, loss_fn, inputs, targets)
    return grads.T @ grads / grads.shape[0]


def output_jacobians(model: nn.Module, inputs: Tensor) -> Tensor:
    """``(N, K, P)``: the Jacobian of each example's ``K`` outputs w.r.t. the parameters."""
    params = _params(model)

    def one(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, p, (x[None],))[0]

    jac = vmap(jacrev(one), in_dims=(None, 0))(params, inputs)
    return torch.cat([j.flatten(2) for j in jac.values()], dim=2)


def exact_fisher(model: nn.Module, inputs: Tensor, likelihood: Likelihood) -> Tensor:
    """The true Fisher ``E_n E_{y~p(y|x_n)}[∇log p ∇log pᵀ] = E_n[J_nᵀ H_n J_n]``.

    ``likelihood``: ``"categorical"`` (outputs are logits, ``H = diag(p) − ppᵀ``) or
    ``"gaussian"`` (outputs are the mean of a unit-variance Gaussian, ``H = I``).
    For these exponential families it equals the generalized Gauss-Newton matrix.
    """
    jac = output_jacobians(model, inputs)
    if likelihood == "gaussian":
        return torch.einsum("nkp,nkq->pq", jac, jac) / jac.shape[0]
    if likelihood == "categorical":
        with torch.no_grad():
            probs = torch.softmax(model(inputs), dim=-1)
        hessian = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        return torch.einsum("nkp,nkl,nlq->pq", jac, hessian, jac) / jac.shape[0]
    raise ValueError(f"Invalid likelihood: {likelihood!r} (use 'categorical' or 'gaussian')")


def flat_gradient(model: nn.Module) -> Tensor:
    """The current ``.grad`` of the trainable parameters, in the order of this module."""
    params = [p for p in model.parameters() if p.requires_grad]
    return flatten_like([p.grad for p in params], params)


def layer_indices(model: nn.Module, layer_name: str) -> Tensor:
    """Positions of a layer's parameters in the flat order, arranged in ngrl's block order.

    For a layer with ``weight`` (first dimension = outputs) and ``bias``, row ``i`` of
    ``Ŵ = [W | b]`` is ``W[i].flatten()`` followed by ``b[i]``; any other layer keeps the
    concatenation of its own parameters. A transposed convolution's ``W`` is that of its
    equivalent convolution (channels swapped, kernel flipped); a recurrent module's map
    ``"lstm.ih_l0"`` is ``[W | b]`` of ``weight_ih_l0`` and ``bias_ih_l0``; an attention
    module's in-projection ``"attn.in_proj"`` is ``[W | b]`` of ``in_proj_weight`` and
    ``in_proj_bias``; an embedding's block is ``Wᵀ`` (row ``i`` is dimension ``i`` of every
    row of the table).
    """
    offsets: dict[str, Tensor] = {}
    start = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            offsets[name] = torch.arange(start, start + p.numel()).reshape(p.shape)
            start += p.numel()
    parent, _, last = layer_name.rpartition(".")
    within = f"{parent}." if parent else ""  # the owner module's parameter-name prefix
    owner = model.get_submodule(parent) if _MAP.fullmatch(last) else None
    if _RECURRENT_MAP.fullmatch(last) and isinstance(owner, nn.RNNBase):
        # one dense map of a recurrent module: [W | b] of weight_ih_l0 and bias_ih_l0
        part, suffix = last.split("_", 1)
        return _dense_order(
            offsets[f"{within}weight_{part}_{suffix}"],
            offsets.get(f"{within}bias_{part}_{suffix}"),
        )
    if last == "in_proj" and isinstance(owner, nn.MultiheadAttention):
        return _dense_order(
            offsets[f"{within}in_proj_weight"], offsets.get(f"{within}in_proj_bias")
        )
    prefix = f"{layer_name}." if layer_name else ""
    own = {n[len(prefix) :]: idx for n, idx in offsets.items() if n.startswith(prefix)}
    own = {n: idx for n, idx in own.items() if "." not in n}
    if not own:
        raise ValueError(f"layer {layer_name!r} has no trainable parameters of its own")
    module = model.get_submodule(layer_name)
    kronecker = isinstance(module, nn.Linear) or (
        isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1
    )
    if kronecker and isinstance(module, nn.modules.conv._ConvTransposeNd) and "weight" in own:
        # the equivalent convolution's weight: channels swapped, the kernel flipped
        spatial = tuple(range(2, own["weight"].dim()))
        own["weight"] = own["weight"].transpose(0, 1).flip(spatial)
    if kronecker and "weight" in own:
        return _dense_order(own["weight"].reshape(own["weight"].shape[0], -1), own.get("bias"))
    if isinstance(module, nn.Embedding) and "weight" in own:
        return own["weight"].T.flatten()
    return torch.cat([idx.flatten() for idx in own.values()])


def _dense_order(weight: Tensor, bias: Tensor | None) -> Tensor:
    """The positions of ``Ŵ = [W | b]``, row by row."""
    columns = [weight] + ([bias[:, None]] if bias is not None else [])
    return torch.cat(columns, dim=1).flatten()


#: The name of one dense map of a recurrent module (:func:`ngrl.layers.recurrent_layers`).
_RECURRENT_MAP = re.compile(r"(ih|hh|hr)_l\d+(_reverse)?")
#: The name of a dense map inside a module: a recurrent map or an attention's in-projection.
_MAP = re.compile(rf"{_RECURRENT_MAP.pattern}|in_proj")
