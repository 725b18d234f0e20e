"""The hooks that record the curvature statistics of a model's layers.

For every supported layer the forward hook keeps a reference to the layer input (autograd
keeps it alive anyway) and attaches a hook to the layer output; when a backward pass runs
inside ``with capture.active():`` the output hook receives ``∂L/∂s``, turns the pair into
the ``(a, g)`` statistics of :mod:`ngrl.curvature.base` and hands them to a sink (the
optimizer's curvature block). Outside the context the hooks return at once.

Tensor hooks on the output are used instead of ``register_full_backward_hook``, which
breaks when an in-place activation follows the layer (a known K-FAC pitfall).

Which layers there are and what statistics each hands over: :mod:`ngrl.layers`. Recurrent
modules get a forward hook that recomputes their output step by step
(:func:`ngrl.recurrent.unroll`) so that every time step's statistics can be taken; an
attention module one that recomputes it with its projections in the open
(:func:`ngrl.attention.unroll`).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ngrl import attention
from ngrl.attention import AttentionStatistics
from ngrl.layers import AttentionLayer, Layer, RecurrentLayer, WeightSharing
from ngrl.recurrent import MapStatistics, unroll

__all__ = [
    "Capture",
    "example_gradients",
    "squared_gradient_norm_sum",
    "squared_gradient_sum",
]

Reduction = Literal["mean", "sum"]

Unrolled = list[MapStatistics] | list[AttentionStatistics]
#: The latest recomputed output of each recurrent or attention module and its maps'
#: statistics, so that a second capture on the same module (two optimizers) hooks the same
#: tensors instead of replacing the output again.
_UNROLLED: weakref.WeakKeyDictionary[nn.Module, tuple[object, Unrolled]] = (
    weakref.WeakKeyDictionary()
)
Sink = Callable[["Layer", "Tensor | None", Tensor], None]


def example_gradients(a: Tensor, g: Tensor) -> Tensor:
    """Per-example gradients ``∇Ŵ ℓ_n = Σ_t g_{n,t} ā_{n,t}ᵀ``, shape ``(N, d_out, d_in)``.

    ``a`` and ``g`` are the ``"expand"`` statistics of a Kronecker layer,
    ``(N, T, d_in)`` and ``(N, T, d_out)``, with ``g`` scaled to per-example losses.
    """
    # A batched product with g's positions last: for a convolution that is the layout its
    # output gradient has anyway, so nothing is copied.
    return torch.bmm(g.transpose(1, 2), a)


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
        #: Forward passes leave the layers alone (``KFAC.no_statistics``): no outputs kept,
        #: recurrent and attention modules as they are, not recomputed.
        self.paused = False
        self.examples: int | None = None
        # Latest output of each output-hooked layer (with its version at the time), kept for
        # the statistics-only backward; released when a capture context ends.
        self._outputs: dict[str, tuple[Tensor, int]] = {}
        #: Recurrent modules already reported as fed a PackedSequence.
        self._warned_packed: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._handles: list[RemovableHandle] = []
        self._generic_batch: dict[str, int] = {}
        # Batch size seen by the output-hooked layers in this capture: the fallback for a
        # generic layer whose own forward never runs (a bare parameter such as SB3's
        # `log_std`, read by the parent module's methods rather than its forward).
        self._hooked_batch: int | None = None
        self._generic_grads: dict[str, list[Tensor | None]] = {}
        recurrent: dict[int, list[RecurrentLayer]] = {}
        attentions: dict[int, list[AttentionLayer]] = {}
        for layer in self.layers:
            if isinstance(layer, RecurrentLayer):
                recurrent.setdefault(id(layer.module), []).append(layer)
            elif isinstance(layer, AttentionLayer):
                attentions.setdefault(id(layer.attention), []).append(layer)
            elif layer.output_hooked:
                self._handles.append(
                    layer.module.register_forward_hook(self._output_forward(layer))
                )
            else:
                self._handles.append(
                    layer.module.register_forward_hook(self._generic_forward(layer))
                )
                for index, param in enumerate(layer.params):
                    self._handles.append(param.register_hook(self._generic_grad(layer, index)))
        for maps in recurrent.values():
            self._handles.append(
                maps[0].module.register_forward_hook(
                    self._recurrent_forward(maps), with_kwargs=True
                )
            )
        for parts in attentions.values():
            self._handles.append(
                parts[0].attention.register_forward_hook(
                    self._attention_forward(parts), with_kwargs=True
                )
            )

    @contextmanager
    def active(self, examples: int | None = None) -> Iterator[None]:
        """Record statistics from the backward passes run inside this context.

        ``examples``: the number of terms a mean-reduced loss averages, when it is not the
        batch size a layer sees (a recurrent layer called once per time step sees the
        sequences, while the loss averages over sequences × steps); ``None``: each
        layer's batch size.
        """
        self.is_active = True
        self.examples = examples
        try:
            yield
        finally:
            self.is_active = False
            self.examples = None
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
            if self.paused or not torch.is_grad_enabled() or not output.requires_grad:
                return
            self._watch(layer, inputs[0].detach(), output)

        return hook

    def _watch(self, layer: Layer, x: Tensor, output: Tensor) -> None:
        """Record ``layer``'s statistics from ``x`` and the gradient ``output`` gets."""
        self._outputs[layer.name] = (output, output._version)

        def on_grad(grad: Tensor) -> None:
            if self.is_active:
                self._record(layer, x, grad)

        output.register_hook(on_grad)

    def _recurrent_forward(self, maps: list[RecurrentLayer]) -> Callable[..., object]:
        """A recurrent module's forward hook: in a pass that builds a graph, the output is
        recomputed step by step (:func:`ngrl.recurrent.unroll`, the same values) and
        replaces the fused kernel's, so that each map's per-step gradients can be taken."""
        by_key = {(layer.suffix, layer.part): layer for layer in maps}
        module = maps[0].module

        def hook(
            module_: nn.Module, args: tuple[object, ...], kwargs: dict[str, object], output: object
        ) -> object:
            if not self._recomputes(module):
                return None
            inputs = args[0] if args else kwargs.get("input")
            if not isinstance(inputs, Tensor):  # a PackedSequence: no statistics
                if module not in self._warned_packed:
                    self._warned_packed.add(module)
                    warnings.warn(
                        "K-FAC takes no statistics from a PackedSequence: the maps of "
                        f"{maps[0].name.rpartition('.')[0] or '<root>'!r} get plain gradient "
                        "steps; pass padded (N, T, d) tensors to give them Kronecker curvature",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                return None
            hx = args[1] if len(args) > 1 else kwargs.get("hx")
            return self._replace_output(
                module,
                output,
                lambda: unroll(module, inputs, hx),  # type: ignore[arg-type]
                lambda entry: by_key.get((entry.suffix, entry.part)),
            )

        return hook

    def _attention_forward(self, parts: list[AttentionLayer]) -> Callable[..., object]:
        """An attention module's forward hook: in a pass that builds a graph, the output is
        recomputed with the two projections outside the attention
        (:func:`ngrl.attention.unroll`, the same values) and replaces the module's."""
        by_part = {layer.part: layer for layer in parts}
        module = parts[0].attention

        def hook(
            module_: nn.Module, args: tuple[object, ...], kwargs: dict[str, object], output: object
        ) -> object:
            if not self._recomputes(module):
                return None
            return self._replace_output(
                module,
                output,
                lambda: attention.unroll(module, args, kwargs),
                lambda entry: by_part.get(entry.part),
            )

        return hook

    def _recomputes(self, module: nn.Module) -> bool:
        """Whether a recurrent or attention module's forward is to be recomputed for
        statistics: a pass that builds a graph through its parameters, not paused."""
        return (
            not self.paused
            and torch.is_grad_enabled()
            and any(p.requires_grad for p in module.parameters())
        )

    def _replace_output(
        self,
        module: nn.Module,
        output: object,
        recompute: Callable[[], tuple[object, Unrolled]],
        layer_of: Callable[[Any], Layer | None],
    ) -> object:
        """The recomputed output that replaces ``output``, with each of its maps that is a
        layer here watched; when another capture's hook already replaced it (two
        optimizers on one module), its maps are watched and the output kept."""
        earlier = _UNROLLED.get(module)
        if earlier is not None and earlier[0] is output:
            new_output, statistics = None, earlier[1]
        else:
            new_output, statistics = recompute()
            _UNROLLED[module] = (new_output, statistics)
        for entry in statistics:
            layer = layer_of(entry)
            if layer is not None and entry.output.requires_grad:
                self._watch(layer, entry.inputs.detach(), entry.output)
        return new_output

    def _record(self, layer: Layer, x: Tensor, grad: Tensor) -> None:
        x, grad = layer.batched(x, grad)
        n = x.shape[0]
        self._hooked_batch = n
        scale = float(self.examples or n) if self.loss_reduction == "mean" else 1.0
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
            n = self.examples or self._generic_batch.get(name, self._hooked_batch or 1)
            # The batch gradient of a sampled-target loss: n·E[∇L∇Lᵀ] is the Fisher (mean
            # reduction); for a summed loss, E[∇L∇Lᵀ]/n is.
            scale = math.sqrt(n) if self.loss_reduction == "mean" else 1.0 / math.sqrt(n)
            self.sink(layer, None, (layer.gather(grads) * scale)[None])
        self._generic_grads.clear()
