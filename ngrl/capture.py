"""Which layers carry curvature, and the hooks that record their statistics.

For every supported layer the forward hook keeps a reference to the layer input (autograd
keeps it alive anyway) and attaches a hook to the layer output; when a backward pass runs
inside ``with capture.active():`` the output hook receives ``∂L/∂s``, turns the pair into
the ``(a, g)`` statistics of :mod:`ngrl.curvature.base` and hands them to a sink (the
optimizer's curvature block). Outside the context the hooks return at once.

Tensor hooks on the output are used instead of ``register_full_backward_hook``, which
breaks when an in-place activation follows the layer (a known K-FAC pitfall).

Supported: ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` with
``groups=1`` (Kronecker-factored, KFC conventions, bias as the homogeneous coordinate); the affine part
of ``nn.LayerNorm``, ``nn.GroupNorm`` and ``nn.BatchNorm1d/2d/3d`` (exact per-example
gradients of ``(γ, β)``); ``nn.Embedding`` (the indices and the output gradients, for a
Kronecker block with a diagonal input factor). Every other module that owns parameters
becomes a :class:`GenericLayer`, whose statistics are gradient samples for a diagonal
block.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "Capture",
    "Conv2dLayer",
    "ConvLayer",
    "ConvTransposeLayer",
    "EmbeddingLayer",
    "GenericLayer",
    "Layer",
    "LinearLayer",
    "ScaleShiftLayer",
    "example_gradients",
    "find_layers",
    "squared_gradient_norm_sum",
    "squared_gradient_sum",
]

Reduction = Literal["mean", "sum"]
WeightSharing = Literal["expand", "reduce"]
Sink = Callable[["Layer", "Tensor | None", Tensor], None]


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


def example_gradients(a: Tensor, g: Tensor) -> Tensor:
    """Per-example gradients ``∇Ŵ ℓ_n = Σ_t g_{n,t} ā_{n,t}ᵀ``, shape ``(N, d_out, d_in)``.

    ``a`` and ``g`` are the ``"expand"`` statistics of a Kronecker layer,
    ``(N, T, d_in)`` and ``(N, T, d_out)``, with ``g`` scaled to per-example losses.
    """
    return torch.einsum("nto,nti->noi", g, a)


def squared_gradient_sum(a: Tensor, g: Tensor) -> Tensor:
    """``Σ_n (∇Ŵ ℓ_n)²`` (elementwise), shape ``(d_out, d_in)``.

    With one position per example (``T = 1``, any dense layer) this is
    ``(g²)ᵀ(ā²)``, one matrix product and no per-example tensor; convolutions form the
    per-example gradients first (no loop over examples either).
    """
    if a.shape[1] == 1:
        return g[:, 0].square().T @ a[:, 0].square()
    return example_gradients(a, g).square().sum(0)


def squared_gradient_norm_sum(a: Tensor, g: Tensor) -> Tensor:
    """``Σ_n ‖∇Ŵ ℓ_n‖²_F``, a scalar: ``N`` times the trace of the exact Fisher block.

    Dense layers (``T = 1``) need only the norms, ``‖g_n‖²‖ā_n‖²``.
    """
    if a.shape[1] == 1:
        return (g[:, 0].square().sum(1) * a[:, 0].square().sum(1)).sum()
    return example_gradients(a, g).square().sum()


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


def _make_layer(name: str, module: nn.Module) -> Layer:
    factory = _LAYER_TYPES.get(type(module))
    all_trainable = all(p.requires_grad for p in module.parameters(recurse=False))
    if factory is None or not all_trainable:
        return GenericLayer(name, module)
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups != 1:
        return GenericLayer(name, module)
    return factory(name, module)


def find_layers(model: nn.Module, skip_layers: Sequence[str] = ()) -> list[Layer]:
    """Every module owning trainable parameters, in ``named_modules`` order.

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
    for name, module in model.named_modules():
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
        layers.append(_make_layer(name, module))
    return layers


def _qualified(module_name: str, param_name: str) -> str:
    return f"{module_name}.{param_name}" if module_name else param_name


class Capture:
    """Hooks on ``layers`` that hand ``(a, g)`` statistics to ``sink`` while active.

    Args:
        layers: from :func:`find_layers`.
        sink: called as ``sink(layer, a, g)``; ``a`` is ``None`` for generic layers, whose
            ``g`` is one gradient sample ``scale·∇L`` of shape ``(1, P)``.
        loss_reduction: ``"mean"`` (the captured loss averages over the batch: output
            gradients are multiplied by the batch size to give per-example gradients) or
            ``"sum"``.
        batch_size: statistics from the first ``batch_size`` examples only (``None``: all).
        weight_sharing: ``"expand"`` (KFC) or ``"reduce"``, see :meth:`Layer.statistics`.
    """

    def __init__(
        self,
        layers: Sequence[Layer],
        sink: Sink,
        loss_reduction: Reduction = "mean",
        batch_size: int | None = None,
        weight_sharing: WeightSharing = "expand",
    ) -> None:
        self.layers = list(layers)
        self.sink = sink
        self.loss_reduction = loss_reduction
        self.batch_size = batch_size
        self.weight_sharing = weight_sharing
        self.is_active = False
        # Latest output of each output-hooked layer (with its version at the time), kept for
        # the statistics-only backward; released when a capture context ends.
        self._outputs: dict[str, tuple[Tensor, int]] = {}
        self._handles: list[RemovableHandle] = []
        self._generic_batch: dict[str, int] = {}
        # Batch size seen by the output-hooked layers in this capture: the fallback for a
        # generic layer whose own forward never runs (a bare parameter such as SB3's
        # `log_std`, read by the parent module's methods rather than its forward).
        self._hooked_batch: int | None = None
        self._generic_grads: dict[str, list[Tensor | None]] = {}
        for layer in self.layers:
            if layer.output_hooked:
                self._handles.append(
                    layer.module.register_forward_hook(self._output_forward(layer))
                )
            else:
                self._handles.append(
                    layer.module.register_forward_hook(self._generic_forward(layer))
                )
                for index, param in enumerate(layer.params):
                    self._handles.append(param.register_hook(self._generic_grad(layer, index)))

    @contextmanager
    def active(self) -> Iterator[None]:
        """Record statistics from the backward passes run inside this context."""
        self.is_active = True
        try:
            yield
        finally:
            self.is_active = False
            self._outputs.clear()
            self._flush_generic()
            self._generic_batch.clear()
            self._hooked_batch = None

    def gradient_targets(self) -> list[Tensor] | None:
        """Tensors whose gradients feed the statistics of the latest forward pass.

        The layers' outputs and the generic layers' parameters: a backward pass to these
        alone (``torch.autograd.grad``) skips every weight gradient of the Kronecker
        layers. ``None`` when an output was changed in place after the layer (an in-place
        activation) or is gone, so that only a full backward pass gets its gradient right.
        """
        targets: list[Tensor] = []
        for layer in self.layers:
            if not layer.output_hooked:
                targets.extend(layer.params)
                continue
            entry = self._outputs.get(layer.name)
            if entry is None:  # not run in this forward pass: no statistics to take
                continue
            if entry[0]._version != entry[1]:
                return None
            targets.append(entry[0])
        return targets

    def remove(self) -> None:
        """Detach every hook from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # --- output-hooked layers ------------------------------------------------------------
    def _output_forward(self, layer: Layer) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = inputs[0].detach()
            self._outputs[layer.name] = (output, output._version)

            def on_grad(grad: Tensor) -> None:
                if self.is_active:
                    self._record(layer, x, grad)

            output.register_hook(on_grad)

        return hook

    def _record(self, layer: Layer, x: Tensor, grad: Tensor) -> None:
        x, grad = layer.batched(x, grad)
        n = x.shape[0]
        self._hooked_batch = n
        scale = float(n) if self.loss_reduction == "mean" else 1.0
        if self.batch_size is not None and self.batch_size < n:
            x, grad = x[: self.batch_size], grad[: self.batch_size]
        with torch.no_grad():
            a, g = layer.output_statistics(x, grad.detach() * scale, self.weight_sharing)
            self.sink(layer, a, g)

    # --- generic layers ----------------------------------------------------------------
    def _generic_forward(self, layer: Layer) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
            if torch.is_grad_enabled() and inputs and isinstance(inputs[0], Tensor):
                self._generic_batch[layer.name] = inputs[0].shape[0] if inputs[0].dim() else 1

        return hook

    def _generic_grad(self, layer: Layer, index: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if self.is_active:
                grads = self._generic_grads.setdefault(layer.name, [None] * len(layer.params))
                previous = grads[index]
                grads[index] = grad.detach().clone() if previous is None else previous + grad

        return hook

    def _flush_generic(self) -> None:
        """Hand each generic layer its gradient sample once the backward passes are done."""
        by_name = {layer.name: layer for layer in self.layers}
        for name, grads in self._generic_grads.items():
            layer = by_name[name]
            n = self._generic_batch.get(name, self._hooked_batch or 1)
            # The batch gradient of a sampled-target loss: n·E[∇L∇Lᵀ] is the Fisher (mean
            # reduction); for a summed loss, E[∇L∇Lᵀ]/n is.
            scale = math.sqrt(n) if self.loss_reduction == "mean" else 1.0 / math.sqrt(n)
            self.sink(layer, None, (layer.gather(grads) * scale)[None])
        self._generic_grads.clear()
