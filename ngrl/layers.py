"""Which modules carry curvature, and how each turns its input and output gradient into
the statistics of its block.

A :class:`Layer` is a module (or, for recurrent modules, one dense map inside it) whose
parameters share one curvature block; :func:`find_layers` finds them in a model. The hooks
that feed them live in :mod:`ngrl.capture`.

Kronecker-factored (KFC conventions, bias as the homogeneous coordinate): ``nn.Linear``,
``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` with ``groups=1``, and the two dense
maps of every layer and direction of ``nn.RNN``, ``nn.GRU`` and ``nn.LSTM``
(:mod:`ngrl.recurrent`), and the in- and out-projections of ``nn.MultiheadAttention``
(:mod:`ngrl.attention`). Exact per-example gradients: the affine part of ``nn.LayerNorm``,
``nn.GroupNorm`` and ``nn.BatchNorm1d/2d/3d``. Indices and output gradients, for a
Kronecker block with a diagonal input factor: ``nn.Embedding``. Every other module that
owns parameters becomes a :class:`GenericLayer`, whose statistics are gradient samples for
a diagonal block.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngrl import attention

__all__ = [
    "AttentionLayer",
    "Conv2dLayer",
    "ConvLayer",
    "ConvTransposeLayer",
    "EmbeddingLayer",
    "GenericLayer",
    "Layer",
    "LinearLayer",
    "RecurrentLayer",
    "ScaleShiftLayer",
    "WeightSharing",
    "find_layers",
    "recurrent_layers",
]

WeightSharing = Literal["expand", "reduce"]


class Layer:
    """A module whose parameters share one curvature block.

    The block sees the parameters as one gradient of shape :attr:`shape`; :meth:`gather`
    and :meth:`scatter` convert between that view and the per-parameter tensors.
    """

    kronecker = False
    #: Whether the statistics come from the gradient of the layer's output (a tensor hook
    #: set by the forward hook) through :meth:`output_statistics`; otherwise from the
    #: parameters' gradients (a generic layer).
    output_hooked = False

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.params: list[nn.Parameter] = [
            p for p in module.parameters(recurse=False) if p.requires_grad
        ]
        self.shape: tuple[int, ...] = (sum(p.numel() for p in self.params),)

    def gather(self, tensors: Sequence[Tensor | None]) -> Tensor:
        """Combine per-parameter tensors (``None`` counts as zeros) into the block view."""
        flat = [
            torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if t is None else t.reshape(-1)
            for p, t in zip(self.params, tensors, strict=True)
        ]
        return torch.cat(flat)

    def scatter(self, view: Tensor) -> list[Tensor]:
        """Split a block-view tensor back into tensors shaped like the parameters."""
        sizes = [p.numel() for p in self.params]
        return [
            part.reshape(p.shape)
            for part, p in zip(view.reshape(-1).split(sizes), self.params, strict=True)
        ]

    def statistics(
        self, inputs: Tensor, grad_output: Tensor, weight_sharing: WeightSharing = "expand"
    ) -> tuple[Tensor, Tensor]:
        """``(a, g)`` of shapes ``(N, T, d_in)`` and ``(N, T, d_out)`` (Kronecker layers).

        ``weight_sharing="reduce"`` (K-FAC-reduce, Eschenhagen et al. 2023) summarises the
        ``T`` positions of each example first: ``a`` is their mean and ``g`` their sum,
        both of shape ``(N, 1, ·)``.
        """
        raise NotImplementedError(f"{type(self).__name__} has no Kronecker statistics")

    def batched(self, inputs: Tensor, grad_output: Tensor) -> tuple[Tensor, Tensor]:
        """The layer's input and output gradient with a leading batch dimension."""
        return inputs, grad_output

    def output_statistics(
        self, inputs: Tensor, grad_output: Tensor, weight_sharing: WeightSharing
    ) -> tuple[Tensor | None, Tensor]:
        """What the capture hands the layer's block, from a batched input and the
        per-example output gradient (output-hooked layers)."""
        raise NotImplementedError(f"{type(self).__name__} takes no output statistics")


class LinearLayer(Layer):
    """``nn.Linear``: ``Ŵ = [W | b]``; inputs of shape ``(N, …, d_in)``, ``T = ∏ …``."""

    kronecker = True
    output_hooked = True
    #: Number of input dimensions of one unbatched example.
    unbatched_dim = 1

    def __init__(self, name: str, module: nn.Linear) -> None:
        super().__init__(name, module)
        self.has_bias = module.bias is not None
        self.shape = (module.out_features, module.in_features + int(self.has_bias))

    def _dense_map(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        """Take ``Ŵ = [W | b]`` of a dense map that is not a module of its own (a recurrent
        or attention module's weight matrix and its bias, if any) as this layer's."""
        self.params = [weight] + ([bias] if bias is not None else [])
        self.has_bias = bias is not None
        self.shape = (weight.shape[0], weight.shape[1] + int(self.has_bias))

    def gather(self, tensors: Sequence[Tensor | None]) -> Tensor:
        """As :meth:`Layer.gather`, also for tensors with trailing dimensions beyond the
        parameters' (one block view per trailing index: ``(d_out, d_in, *trailing)``)."""
        weight = tensors[0]
        if weight is None:
            weight = torch.zeros_like(self.params[0])
        trailing = weight.shape[self.params[0].dim() :]
        columns = [weight.reshape(weight.shape[0], -1, *trailing)]
        if self.has_bias:
            bias = tensors[1]
            columns.append((torch.zeros_like(self.params[1]) if bias is None else bias)[:, None])
        return torch.cat(columns, dim=1) if self.has_bias else columns[0]

    def scatter(self, view: Tensor) -> list[Tensor]:
        """As :meth:`Layer.scatter`; trailing dimensions of ``(d_out, d_in, *trailing)``
        stay trailing."""
        trailing = view.shape[2:]
        weight_shape = (*self.params[0].shape, *trailing)
        if not self.has_bias:
            return [view.reshape(weight_shape)]
        return [view[:, :-1].reshape(weight_shape), view[:, -1].contiguous()]

    def patches(self, inputs: Tensor) -> Tensor:
        """Layer inputs as ``(N, T, d)`` rows, before the homogeneous coordinate."""
        return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])

    def statistics(
        self, inputs: Tensor, grad_output: Tensor, weight_sharing: WeightSharing = "expand"
    ) -> tuple[Tensor, Tensor]:
        if weight_sharing == "reduce":
            a = self.patch_means(inputs)[:, None]
            g = self.output_rows(grad_output).sum(1, keepdim=True)
        else:
            a = self.patches(inputs)
            g = self.output_rows(grad_output)
        if self.has_bias:
            a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
        return a, g

    def batched(self, inputs: Tensor, grad_output: Tensor) -> tuple[Tensor, Tensor]:
        if inputs.dim() == self.unbatched_dim:  # one example without a batch dimension
            return inputs[None], grad_output[None]
        return inputs, grad_output

    def output_statistics(
        self, inputs: Tensor, grad_output: Tensor, weight_sharing: WeightSharing
    ) -> tuple[Tensor | None, Tensor]:
        return self.statistics(inputs, grad_output, weight_sharing)

    def patch_means(self, inputs: Tensor) -> Tensor:
        """``(N, d)``: each example's inputs averaged over its positions."""
        return self.patches(inputs).mean(1)

    def output_rows(self, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])


class ConvLayer(LinearLayer):
    """``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` (``groups=1``): KFC patches,
    ``T`` = output positions, one patch row ``(c, k_1, …, k_n)`` per position (the order
    of ``weight.flatten(1)``)."""

    def __init__(self, name: str, module: nn.modules.conv._ConvNd) -> None:
        Layer.__init__(self, name, module)
        self.has_bias = module.bias is not None
        self.unbatched_dim = module.weight.dim() - 1  # (C, *spatial)
        fan_in = math.prod(module.weight.shape[1:])
        self.shape = (module.weight.shape[0], fan_in + int(self.has_bias))
        self._conv = module
        #: The geometry of the convolution whose patches :meth:`patches` unfolds from the
        #: input that :meth:`_padded` prepares.
        self.kernel_size: tuple[int, ...] = tuple(module.kernel_size)
        self.stride: tuple[int, ...] = tuple(module.stride)
        self.dilation: tuple[int, ...] = tuple(module.dilation)

    def _padded(self, inputs: Tensor) -> Tensor:
        """The input padded as the layer pads it, so that patches need no further padding."""
        conv = self._conv
        if not any(conv._reversed_padding_repeated_twice):
            return inputs
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        return F.pad(inputs, conv._reversed_padding_repeated_twice, mode=mode)

    def _output_sizes(self, x: Tensor) -> list[int]:
        return [
            (size - dilation * (kernel - 1) - 1) // stride + 1
            for size, kernel, stride, dilation in zip(
                x.shape[2:], self.kernel_size, self.stride, self.dilation, strict=True
            )
        ]

    def patches(self, inputs: Tensor) -> Tensor:
        x = self._padded(inputs)
        if x.dim() == 4:  # torch's unfold, the fastest path, exists for 2-D only
            columns = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)
            return columns.transpose(1, 2)
        windows = x
        for dim, (kernel, stride, dilation) in enumerate(
            zip(self.kernel_size, self.stride, self.dilation, strict=True), start=2
        ):  # each unfold appends the window of one spatial dimension
            windows = windows.unfold(dim, dilation * (kernel - 1) + 1, stride)[..., ::dilation]
        spatial = len(self.kernel_size)
        order = [0, *range(2, 2 + spatial), 1, *range(2 + spatial, 2 + 2 * spatial)]
        positions = math.prod(self._output_sizes(x))
        return windows.permute(order).reshape(x.shape[0], positions, -1)

    def patch_means(self, inputs: Tensor) -> Tensor:
        # Σ_t of the patches without unfolding them: kernel offset (i, j, …) sees a strided
        # window of the input, so one slice-sum per offset gives the column (c, i, j, …).
        x = self._padded(inputs)
        sizes = self._output_sizes(x)
        spatial = tuple(range(2, x.dim()))
        sums = []
        for offsets in itertools.product(*(range(k) for k in self.kernel_size)):
            window = tuple(
                slice(o * d, o * d + s * (n - 1) + 1, s)
                for o, d, s, n in zip(offsets, self.dilation, self.stride, sizes, strict=True)
            )
            sums.append(x[(slice(None), slice(None), *window)].sum(spatial))
        return torch.stack(sums, dim=2).reshape(x.shape[0], -1) / math.prod(sizes)

    def output_rows(self, grad_output: Tensor) -> Tensor:
        return grad_output.flatten(2).transpose(1, 2)


class ConvTransposeLayer(ConvLayer):
    """``nn.ConvTranspose1d/2d/3d`` (``groups=1``): KFC on the patches of the equivalent
    convolution. A transposed convolution is the adjoint of a convolution: it equals a
    stride-1 convolution, with the same dilation, of the input spread out by the stride
    (``stride − 1`` zeros between entries) and padded by ``dilation·(k − 1) − padding``
    (plus ``output_padding`` at the end; negative values crop), whose weight is
    ``W' = W`` with input and output channels swapped and the kernel flipped. The block
    view is ``[W' | b]``, ``(C_out, C_in·∏k + 1)``; :meth:`gather` and :meth:`scatter`
    convert."""

    def __init__(self, name: str, module: nn.modules.conv._ConvTransposeNd) -> None:
        super().__init__(name, module)
        fan_in = module.in_channels * math.prod(module.kernel_size)
        self.shape = (module.out_channels, fan_in + int(self.has_bias))
        self.spatial = len(module.kernel_size)
        self.input_stride = self.stride
        self.stride = (1,) * self.spatial
        pads = []
        for kernel, dilation, padding, extra in zip(
            module.kernel_size, module.dilation, module.padding, module.output_padding, strict=True
        ):
            before = dilation * (kernel - 1) - padding
            pads.append((before, before + extra))
        # F.pad's order: the last dimension first.
        self._pads = [p for pair in reversed(pads) for p in pair]

    def statistics(
        self, inputs: Tensor, grad_output: Tensor, weight_sharing: WeightSharing = "expand"
    ) -> tuple[Tensor, Tensor]:
        conv = self._conv
        sizes = [
            (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + extra + 1
            for size, stride, padding, dilation, kernel, extra in zip(
                inputs.shape[2:],
                self.input_stride,
                conv.padding,
                self.dilation,
                self.kernel_size,
                conv.output_padding,
                strict=True,
            )
        ]
        if list(grad_output.shape[2:]) != sizes:
            raise ValueError(
                f"Invalid forward of {self.name or '<root>'!r}: an output of size "
                f"{list(grad_output.shape[2:])} instead of {sizes}; K-FAC takes the output "
                "padding from the layer's `output_padding`, not from `output_size=`"
            )
        return super().statistics(inputs, grad_output, weight_sharing)

    def _equivalent_weight(self, weight: Tensor) -> Tensor:
        """``W'`` from ``W`` (with any trailing dimensions after the kernel's)."""
        kernel_dims = tuple(range(2, 2 + self.spatial))
        return weight.transpose(0, 1).flip(kernel_dims)

    def gather(self, tensors: Sequence[Tensor | None]) -> Tensor:
        weight = tensors[0]
        if weight is None:
            weight = torch.zeros_like(self.params[0])
        return super().gather([self._equivalent_weight(weight), *tensors[1:]])

    def scatter(self, view: Tensor) -> list[Tensor]:
        trailing = view.shape[2:]
        equivalent = (self.shape[0], self.params[0].shape[0], *self.kernel_size, *trailing)
        weight = view[:, : self.shape[1] - int(self.has_bias)].reshape(equivalent)
        parts = [self._equivalent_weight(weight).contiguous()]  # its own inverse
        return parts + ([view[:, -1].contiguous()] if self.has_bias else [])

    def _padded(self, inputs: Tensor) -> Tensor:
        x = inputs
        for dim, stride in enumerate(self.input_stride, start=2):
            if stride > 1:
                size = list(x.shape)
                size[dim] = (x.shape[dim] - 1) * stride + 1
                spread = x.new_zeros(size)
                index = [slice(None)] * x.dim()
                index[dim] = slice(None, None, stride)
                spread[tuple(index)] = x
                x = spread
        return F.pad(x, self._pads) if any(self._pads) else x


#: The name of the first supported convolution (every ``ConvLayer``).
Conv2dLayer = ConvLayer


class ScaleShiftLayer(Layer):
    """The elementwise affine ``y = γ ⊙ x̂ + β`` of ``nn.LayerNorm``, ``nn.GroupNorm`` and
    ``nn.BatchNorm1d/2d/3d`` (kfac-jax's scale-and-shift layer): statistics are the exact
    per-example gradients ``(Σ_t g_t ⊙ x̂_t, Σ_t g_t)``, over the positions ``t`` that
    share ``γ`` and ``β``, with ``x̂`` the layer's own normalisation of its input
    (batch-norm layers in training mode: with this batch's statistics, taken as given).
    The block view is ``γ`` then ``β``, flattened (the parameters' order)."""

    output_hooked = True

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__(name, module)
        self._norm = module
        self.has_bias = getattr(module, "bias", None) is not None

    def normalized(self, inputs: Tensor) -> Tensor:
        """``x̂``: the input normalised as the layer does, without its affine part."""
        norm = self._norm
        if isinstance(norm, nn.LayerNorm):
            return F.layer_norm(inputs, norm.normalized_shape, None, None, norm.eps)
        if isinstance(norm, nn.GroupNorm):
            return F.group_norm(inputs, norm.num_groups, None, None, norm.eps)
        assert isinstance(norm, nn.modules.batchnorm._BatchNorm)
        batch_statistics = norm.training or norm.running_mean is None
        return F.batch_norm(
            inputs,
            None if batch_statistics else norm.running_mean,
            None if batch_statistics else norm.running_var,
            training=batch_statistics,
            eps=norm.eps,
        )

    def example_rows(self, inputs: Tensor, grad_output: Tensor) -> Tensor:
        """``(N, P)``: each example's gradient of ``(γ, β)``, flattened in the block view."""
        x_hat = self.normalized(inputs)
        n = inputs.shape[0]
        if isinstance(self._norm, nn.LayerNorm):
            # γ covers the trailing normalized_shape; the leading dimensions are positions.
            shape = (n, -1, *self._norm.normalized_shape)
            scale = (grad_output * x_hat).reshape(shape).sum(1).flatten(1)
            shift = grad_output.reshape(shape).sum(1).flatten(1)
        else:  # one γ per channel (dimension 1), shared by the positions after it
            scale = (grad_output * x_hat).flatten(2).sum(2)
            shift = grad_output.flatten(2).sum(2)
        return torch.cat([scale, shift], dim=1) if self.has_bias else scale

    def output_statistics(
        self, inputs: Tensor, grad_output: Tensor, weight_sharing: WeightSharing
    ) -> tuple[Tensor | None, Tensor]:
        return None, self.example_rows(inputs, grad_output)


class EmbeddingLayer(Layer):
    """``nn.Embedding``: the lookup ``y_t = W[i_t]`` is a dense layer without bias on the
    one-hot input ``e_{i_t}``, ``y_t = Wᵀ e_{i_t}``. The block view is ``Wᵀ``, shape
    ``(d_out, d_in) = (embedding_dim, num_embeddings)``.

    Statistics: ``a`` holds the indices, ``(N, T)`` integers (the one-hot rows are never
    formed), ``g`` the output gradients ``(N, T, embedding_dim)``; positions at
    ``padding_idx``, which receive no gradient, have index ``-1``. ``max_norm`` only
    rescales rows of ``W`` before the lookup, so the statistics are the same. Sparse
    gradients and ``scale_grad_by_freq`` (a gradient that is not a sum over examples) are
    refused.
    """

    output_hooked = True

    def __init__(self, name: str, module: nn.Embedding) -> None:
        for option in ("sparse", "scale_grad_by_freq"):
            if getattr(module, option):
                raise ValueError(
                    f"Invalid model: embedding {name or '<root>'!r} has {option}=True; "
                    f"K-FAC needs dense per-example gradients (set {option}=False, or "
                    "leave the layer out with skip_layers)"
                )
        super().__init__(name, module)
        self.shape = (module.embedding_dim, module.num_embeddings)
        self.padding_idx = module.padding_idx

    def gather(self, tensors: Sequence[Tensor | None]) -> Tensor:
        weight = tensors[0]
        return (torch.zeros_like(self.params[0]) if weight is None else weight).transpose(0, 1)

    def scatter(self, view: Tensor) -> list[Tensor]:
        return [view.transpose(0, 1).contiguous()]

    def batched(self, inputs: Tensor, grad_output: Tensor) -> tuple[Tensor, Tensor]:
        if inputs.dim() == 0:  # one index without a batch dimension
            return inputs[None], grad_output[None]
        return inputs, grad_output

    def output_statistics(
        self, inputs: Tensor, grad_output: Tensor, weight_sharing: WeightSharing
    ) -> tuple[Tensor | None, Tensor]:
        # Always the expanded statistics: averaging one-hot rows over positions (reduce)
        # would make the input factor dense.
        n = inputs.shape[0]
        indices = inputs.reshape(n, -1)
        if self.padding_idx is not None:
            indices = indices.masked_fill(indices == self.padding_idx, -1)
        return indices, grad_output.reshape(n, indices.shape[1], grad_output.shape[-1])


class RecurrentLayer(LinearLayer):
    """One dense map of a recurrent module: ``W_ih`` or ``W_hh`` of layer ``k`` and
    direction ``d``, with its bias (``Ŵ = [W | b]``, shape ``(gates·H, d_in + 1)``), or an
    LSTM's projection ``W_hr`` (``proj_size``; no bias).

    Named ``"{module}.ih_l{k}"`` / ``"{module}.hh_l{k}"`` / ``"{module}.hr_l{k}"``
    (``_reverse`` for the backward direction), after the parameters ``weight_ih_l{k}`` and
    ``bias_ih_l{k}``.
    """

    def __init__(self, name: str, module: nn.RNNBase, part: str, suffix: str) -> None:
        self.name = name
        self.module = module
        self.part = part
        self.suffix = suffix
        weight = getattr(module, f"weight_{part}{suffix}")
        bias = getattr(module, f"bias_{part}{suffix}", None) if module.bias else None
        self._dense_map(weight, bias)

    def output_statistics(
        self, inputs: Tensor, grad_output: Tensor, weight_sharing: WeightSharing
    ) -> tuple[Tensor | None, Tensor]:
        # Always one position per time step, in the order the direction runs: recurrent
        # blocks model the time steps themselves.
        return self.statistics(inputs, grad_output, "expand")


def recurrent_layers(name: str, module: nn.RNNBase) -> list[RecurrentLayer]:
    """The maps of every layer and direction of ``module`` (input, hidden and, for an LSTM
    with ``proj_size``, projection), in parameter order."""
    prefix = f"{name}." if name else ""
    parts = ("ih", "hh", "hr") if getattr(module, "proj_size", 0) else ("ih", "hh")
    layers = []
    for k in range(module.num_layers):
        for suffix in (f"_l{k}", f"_l{k}_reverse")[: 2 if module.bidirectional else 1]:
            for part in parts:
                layers.append(RecurrentLayer(f"{prefix}{part}{suffix}", module, part, suffix))
    return layers


class AttentionLayer(LinearLayer):
    """One dense map of an ``nn.MultiheadAttention``: the packed in-projection
    ``[W_q; W_k; W_v]`` with ``in_proj_bias`` (shape ``(3E, E + 1)``), named
    ``"{module}.in_proj"``, or the out-projection ``out_proj`` (``(E, E + 1)``), named
    after that submodule. Neither runs as a module of its own: the attention module's hook
    feeds both (:func:`ngrl.attention.unroll`), the positions of the in-projection being
    those of the query, key and value (one set in self-attention).
    """

    def __init__(self, name: str, module: nn.MultiheadAttention, part: str) -> None:
        self.name = name
        self.attention = module
        self.part = part
        if part == "in_proj":
            self.module: nn.Module = module
            self._dense_map(module.in_proj_weight, module.in_proj_bias)
        else:
            self.module = module.out_proj
            self._dense_map(module.out_proj.weight, module.out_proj.bias)


class GenericLayer(Layer):
    """Any other module with parameters: statistics are gradient samples for a diagonal block."""

    @property
    def free_parameters(self) -> bool:
        """Whether these are parameters registered directly on a container module defined
        outside ``torch.nn`` (SB3's ``log_std`` on its policy), which the container's
        methods read, rather than the weights of a layer type K-FAC does not support."""
        module = self.module
        is_torch_type = type(module).__module__.startswith("torch.nn")
        return not is_torch_type and next(module.children(), None) is not None


_LAYER_TYPES: dict[type[nn.Module], Callable[[str, nn.Module], Layer]] = {
    nn.LayerNorm: ScaleShiftLayer,
    nn.GroupNorm: ScaleShiftLayer,
    nn.BatchNorm1d: ScaleShiftLayer,
    nn.BatchNorm2d: ScaleShiftLayer,
    nn.BatchNorm3d: ScaleShiftLayer,
    nn.Linear: LinearLayer,
    nn.Embedding: EmbeddingLayer,
    nn.Conv1d: ConvLayer,
    nn.Conv2d: ConvLayer,
    nn.Conv3d: ConvLayer,
    nn.ConvTranspose1d: ConvTransposeLayer,
    nn.ConvTranspose2d: ConvTransposeLayer,
    nn.ConvTranspose3d: ConvTransposeLayer,
}


def _make_layers(
    name: str, module: nn.Module, attention_of: dict[int, nn.MultiheadAttention]
) -> list[Layer]:
    all_trainable = all(p.requires_grad for p in module.parameters(recurse=False))
    if type(module) in (nn.RNN, nn.GRU, nn.LSTM) and all_trainable:
        return list(recurrent_layers(name, module))  # type: ignore[arg-type]
    if id(module) in attention_of and all_trainable:  # a supported attention's out_proj
        return [AttentionLayer(name, attention_of[id(module)], "out_proj")]
    if type(module) is nn.MultiheadAttention and all_trainable and attention.supports(module):
        return [AttentionLayer(f"{name}.in_proj" if name else "in_proj", module, "in_proj")]
    factory = _LAYER_TYPES.get(type(module))
    if factory is None or not all_trainable:
        return [GenericLayer(name, module)]
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups != 1:
        return [GenericLayer(name, module)]
    return [factory(name, module)]


def find_layers(model: nn.Module, skip_layers: Sequence[str] = ()) -> list[Layer]:
    """Every module owning trainable parameters, in ``named_modules`` order (a recurrent
    module gives one layer per dense map, :func:`recurrent_layers`; a multi-head attention
    its in-projection, and its out-projection under that submodule's name).

    A parameter owned by two of them (tied weights) is refused with a ``ValueError``.

    ``skip_layers`` holds regular expressions matched (``re.search``) against the module
    name and its class name; matching modules are left out (their parameters get plain
    gradient steps from the optimizer).
    """
    try:
        patterns = [re.compile(p) for p in skip_layers]
    except re.error as error:
        raise ValueError(f"Invalid skip_layers pattern: {error.pattern!r} ({error})") from None
    layers = []
    owners: dict[int, str] = {}
    # The out-projection of an attention module K-FAC supports, which its parent runs.
    attention_of: dict[int, nn.MultiheadAttention] = {}
    for name, module in model.named_modules():
        if type(module) is nn.MultiheadAttention and attention.supports(module):
            attention_of[id(module.out_proj)] = module
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if any(p.search(name) or p.search(type(module).__name__) for p in patterns):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if param.requires_grad and owners.setdefault(id(param), name) != name:
                raise ValueError(
                    f"Invalid model: parameter {_qualified(name, param_name)!r} is shared "
                    f"by layers {owners[id(param)] or '<root>'!r} and {name or '<root>'!r} "
                    "(tied weights); a per-layer curvature block cannot precondition it. "
                    "Untie it, or leave one of the layers out with skip_layers"
                )
        layers.extend(_make_layers(name, module, attention_of))
    return layers


def _qualified(module_name: str, param_name: str) -> str:
    return f"{module_name}.{param_name}" if module_name else param_name
