"""``nn.MultiheadAttention`` with its two dense maps in the open, so that K-FAC sees their
inputs and output gradients at every position.

The module's in-projection ``[q | k | v] = x W_inᵀ + b_in`` (one packed ``(3E, E)`` weight)
and its out-projection ``y = o W_outᵀ + b_out`` run inside
``F.multi_head_attention_forward``, where no module hook reaches them. :func:`unroll`
recomputes the module's output with both maps outside it, handing the attention itself
(heads, masks, dropout, ``add_zero_attn``) the projected ``q``, ``k`` and ``v`` with
identity projections, so that masks and options behave exactly as in the module.

Each map is a dense layer shared by positions (:class:`ngrl.layers.AttentionLayer`). In
self-attention (``query is key is value``) the in-projection is one dense map over the
sequence's positions. When the query, key and value are different tensors, each is a
different set of positions of the same weight: the map runs over all their positions
(concatenated) with the full ``3E`` outputs, and only the rows a position feeds (``q``
for the query's, ``k`` and ``v`` for the key's and value's) get a gradient, so the
gradient of the weight is exact and the statistics are K-FAC-expand over those positions.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AttentionStatistics", "supports", "unroll"]


class AttentionStatistics(NamedTuple):
    """What one dense map of :func:`unroll` saw: its inputs ``(N, P, d_in)`` and the tensor
    ``(N, P, d_out)`` whose gradient is its output gradient."""

    part: str  # "in_proj" or "out_proj"
    inputs: Tensor
    output: Tensor


_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def supports(module: nn.MultiheadAttention) -> bool:
    """Whether :func:`unroll` covers ``module``: one packed in-projection (key and value
    of the embedding's width) and no learned key/value biases (``add_bias_kv``), which
    would be parameters outside the two maps."""
    return module._qkv_same_embed_dim and module.bias_k is None and module.bias_v is None


def unroll(
    module: nn.MultiheadAttention, args: tuple[object, ...], kwargs: dict[str, object]
) -> tuple[tuple[Tensor, Tensor | None], list[AttentionStatistics]]:
    """``module(*args, **kwargs)`` with its two maps outside the attention, and their
    statistics; the same output (and attention weights) as the module's own forward."""
    bound = _SIGNATURE.bind(module, *args, **kwargs)
    bound.apply_defaults()
    call = bound.arguments
    query, key, value = call["query"], call["key"], call["value"]
    batched = query.dim() == 3

    def batch_first(x: Tensor) -> Tensor:  # (N, L, E), whatever the module's layout
        if not batched:
            return x[None]
        return x if module.batch_first else x.transpose(0, 1)

    # The distinct input tensors, each a run of positions of the in-projection.
    distinct: list[Tensor] = []
    for x in (query, key, value):
        if not any(x is seen for seen in distinct):
            distinct.append(x)
    inputs = [batch_first(x) for x in distinct]
    lengths = [x.shape[1] for x in inputs]
    positions = torch.cat(inputs, dim=1) if len(inputs) > 1 else inputs[0]
    packed = F.linear(positions, module.in_proj_weight, module.in_proj_bias)
    runs = packed.split(lengths, dim=1)
    e = module.embed_dim

    def projected(x: Tensor, row: int) -> Tensor:  # back in the layout the function takes
        index = next(i for i, seen in enumerate(distinct) if x is seen)
        part = runs[index][..., row * e : (row + 1) * e]
        return part.transpose(0, 1) if batched else part[0]

    q, k, v = projected(query, 0), projected(key, 1), projected(value, 2)
    eye = torch.eye(e, dtype=packed.dtype, device=packed.device)
    attended, weights = F.multi_head_attention_forward(
        q,
        k,
        v,
        e,
        module.num_heads,
        None,
        None,
        None,
        None,
        module.add_zero_attn,
        module.dropout,
        eye,
        None,
        training=module.training,
        key_padding_mask=call["key_padding_mask"],
        need_weights=call["need_weights"],
        attn_mask=call["attn_mask"],
        use_separate_proj_weight=True,
        q_proj_weight=eye,
        k_proj_weight=eye,
        v_proj_weight=eye,
        average_attn_weights=call["average_attn_weights"],
        is_causal=call["is_causal"],
    )
    heads = attended.transpose(0, 1) if batched else attended[None]  # (N, L, E)
    out = F.linear(heads, module.out_proj.weight, module.out_proj.bias)
    statistics = [
        AttentionStatistics("in_proj", positions, packed),
        AttentionStatistics("out_proj", heads, out),
    ]
    if not batched:
        output = out[0]
    else:
        output = out if module.batch_first else out.transpose(0, 1)
    return (output, weights), statistics
