"""``nn.RNN``, ``nn.GRU`` and ``nn.LSTM`` written out step by step, so that K-FAC sees the
inputs and output gradients of every weight matrix at every time step.

A recurrent layer ``k`` (direction ``d``) has two dense maps shared by the ``T`` steps: the
input map ``u_t = W_ih x_t + b_ih`` and the hidden map ``v_t = W_hh h_{t−1} + b_hh``, whose
sum (GRU: with ``r ⊙`` on the hidden part of its candidate) feeds the gates; an LSTM with
``proj_size`` has a third, the projection ``h_t = W_hr (o_t ⊙ tanh c_t)`` (no bias). Each is a dense
layer over a sequence, :class:`ngrl.layers.RecurrentLayer`, with the positions being the
time steps in the order the direction runs. :func:`unroll` recomputes the module's output
through these equations (PyTorch's cell equations, without its fused kernels) and returns
for every map its inputs ``(N, T, d_in)`` and a tensor ``(N, T, gates)`` whose gradient is
the map's output gradient: ``u`` itself, and for ``v`` (and the projection) a zero tensor
added to it at every step (the steps' ``v_t`` are separate tensors; the sum's gradient
collects them).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MapStatistics", "unroll"]


class MapStatistics(NamedTuple):
    """What one dense map of :func:`unroll` saw: its inputs ``(N, T, d_in)`` and the tensor
    ``(N, T, gates)`` whose gradient is its output gradient."""

    suffix: str
    part: str
    inputs: Tensor
    output: Tensor


def unroll(
    module: nn.RNNBase, inputs: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None
) -> tuple[tuple[Tensor, Tensor | tuple[Tensor, Tensor]], list[MapStatistics]]:
    """``module(inputs, hx)`` computed step by step, and the statistics of every map.

    Same layouts as the module (``batch_first``, unbatched ``(T, d)`` inputs), the same
    output; the dropout between layers (training mode) draws its own mask.
    """
    batched = inputs.dim() == 3
    if not batched:
        x = inputs[None]
    else:
        x = inputs if module.batch_first else inputs.transpose(0, 1)
    n = x.shape[0]
    directions = 2 if module.bidirectional else 1
    states = module.num_layers * directions
    is_lstm = module.mode == "LSTM"
    if hx is None:
        h_size = getattr(module, "proj_size", 0) or module.hidden_size
        h0 = x.new_zeros(states, n, h_size)
        c0 = x.new_zeros(states, n, module.hidden_size) if is_lstm else None
    else:
        h0, c0 = hx if is_lstm else (hx, None)  # type: ignore[misc]
        if not batched:
            h0, c0 = h0[:, None], (None if c0 is None else c0[:, None])
    maps: list[MapStatistics] = []
    final_h: list[Tensor] = []
    final_c: list[Tensor] = []
    layer_input = x
    for k in range(module.num_layers):
        outputs = []
        for d in range(directions):
            suffix = f"_l{k}" + ("_reverse" if d else "")
            state = k * directions + d
            sequence = layer_input.flip(1) if d else layer_input
            out, h, c = _run_direction(
                module, suffix, sequence, h0[state], None if c0 is None else c0[state], maps
            )
            outputs.append(out.flip(1) if d else out)
            final_h.append(h)
            if c is not None:
                final_c.append(c)
        layer_input = torch.cat(outputs, dim=2) if directions == 2 else outputs[0]
        if k < module.num_layers - 1 and module.dropout > 0 and module.training:
            layer_input = F.dropout(layer_input, module.dropout, training=True)
    output = layer_input
    h_n = torch.stack(final_h)
    c_n = torch.stack(final_c) if is_lstm else None
    if not batched:
        output, h_n = output[0], h_n[:, 0]
        c_n = None if c_n is None else c_n[:, 0]
    elif not module.batch_first:
        output = output.transpose(0, 1)
    state_out: Tensor | tuple[Tensor, Tensor] = (h_n, c_n) if c_n is not None else h_n
    return (output, state_out), maps


def _run_direction(
    module: nn.RNNBase,
    suffix: str,
    sequence: Tensor,
    h: Tensor,
    c: Tensor | None,
    maps: list[MapStatistics],
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer in one direction over ``sequence`` ``(N, T, d_in)``: its outputs
    ``(N, T, H)`` and final states; appends the statistics of its maps to ``maps``."""
    weight_ih = getattr(module, f"weight_ih{suffix}")
    weight_hh = getattr(module, f"weight_hh{suffix}")
    weight_hr = getattr(module, f"weight_hr{suffix}", None) if module.mode == "LSTM" else None
    bias_ih = getattr(module, f"bias_ih{suffix}") if module.bias else None
    bias_hh = getattr(module, f"bias_hh{suffix}") if module.bias else None
    n, steps = sequence.shape[0], sequence.shape[1]
    u = F.linear(sequence, weight_ih, bias_ih)
    # v_t of every step gets this zero tensor's slice t added: its gradient is (∂L/∂v_t)_t.
    v_offset = u.new_zeros(n, steps, weight_hh.shape[0]).requires_grad_(u.requires_grad)
    if weight_hr is not None:
        r_offset = u.new_zeros(n, steps, weight_hr.shape[0]).requires_grad_(u.requires_grad)
    previous, unprojected, outputs = [], [], []
    for t in range(steps):
        previous.append(h)
        v = F.linear(h, weight_hh, bias_hh) + v_offset[:, t]
        h, c = _cell(module.mode, u[:, t], v, h, c)
        if weight_hr is not None:
            unprojected.append(h)
            h = F.linear(h, weight_hr) + r_offset[:, t]
        outputs.append(h)
    maps.append(MapStatistics(suffix, "ih", sequence, u))
    maps.append(MapStatistics(suffix, "hh", torch.stack(previous, dim=1), v_offset))
    if weight_hr is not None:
        maps.append(MapStatistics(suffix, "hr", torch.stack(unprojected, dim=1), r_offset))
    return torch.stack(outputs, dim=1), h, c


def _cell(
    mode: str, u: Tensor, v: Tensor, h: Tensor, c: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """PyTorch's cell equations from the two maps' outputs ``u`` and ``v``."""
    if mode == "LSTM":
        assert c is not None
        i, f, g, o = (u + v).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        u_r, u_z, u_n = u.chunk(3, dim=-1)
        v_r, v_z, v_n = v.chunk(3, dim=-1)
        r = torch.sigmoid(u_r + v_r)
        z = torch.sigmoid(u_z + v_z)
        candidate = torch.tanh(u_n + r * v_n)
        return (1 - z) * candidate + z * h, None
    pre = u + v
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None
