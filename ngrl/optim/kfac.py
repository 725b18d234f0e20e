"""The K-FAC optimizer: curvature blocks per layer, a trust region, then momentum SGD."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

import ngrl.curvature  # noqa: F401  (registers every approximation)
from ngrl import distributed
from ngrl.capture import Capture, Layer, Reduction, WeightSharing, find_layers
from ngrl.curvature.base import CurvatureBlock, get_block_class
from ngrl.curvature.diagonal import DiagonalBlock
from ngrl.optim.hyperparams import Schedule, check, check_choice, resolve
from ngrl.optim.trust_region import kl_clip_scale

__all__ = ["KFAC"]


class KFAC(torch.optim.Optimizer):
    r"""Natural-gradient descent with Kronecker-factored curvature and a KL trust region.

    K-FAC (Martens & Grosse 2015, arXiv:1503.05671; KFC for convolutions, Grosse & Martens
    2016) with the trust region of ACKTR (Wu et al. 2017, arXiv:1708.05144). Per layer,
    with ``∇Ŵ = [∇W | ∇b]`` and the damped curvature block ``F̂ + λI``:

    .. code-block:: text

        X  = (F̂ + λI)⁻¹ ∇Ŵ                          (for K-FAC: G X A + λX = ∇Ŵ)
        ν  = min(1, sqrt(kl_clip / (lr² Σ_layers ⟨X, ∇Ŵ⟩)))
        d  = ν X + weight_decay · Ŵ
        m ← momentum · m + (1 − dampening) · d;   Ŵ ← Ŵ − lr · m

    The buffer starts at ``m = 0``, as in TF's ``MomentumOptimizer`` (openai/baselines'
    ACKTR): the first step is ``(1 − dampening)·d``. (``torch.optim.SGD`` instead starts
    at ``m = d``; the two agree when ``dampening = 0``.)

    Statistics come only from backward passes run inside ``with opt.capture():``, usually
    of :func:`ngrl.fisher_loss` (sampled targets give the true Fisher). Factors are
    exponential moving averages (``factor_decay``) refreshed every ``factor_update_steps``
    steps (see :attr:`capture_due`); eigendecompositions every ``inv_update_steps``.

    Args:
        model: the module to optimize; hooks are attached to its layers.
        lr: learning rate.
        damping: Tikhonov damping λ added to the whole curvature block.
        kl_clip: trust-region radius δ of the predicted KL; ``None`` disables it.
        momentum: heavy-ball momentum on the (clipped) natural gradient.
        dampening: ``torch.optim.SGD``'s dampening of the momentum. ACKTR's update
            (``MomentumOptimizer(lr·(1−μ), μ)`` in openai/baselines) is
            ``dampening=momentum``: the momentum buffer becomes an average of the
            directions, so the trust region bounds the steady-state step.
        weight_decay: L2 coefficient added to the step direction.
        factor_decay: EMA decay ``d`` of the curvature statistics.
        factor_update_steps: capture statistics every this many steps.
        inv_update_steps: recompute eigendecompositions every this many steps.
        curvature: name of the approximation for dense and conv layers (see
            :func:`ngrl.curvature.available`); other layers with parameters get a
            diagonal block.
        skip_layers: regular expressions on module names or class names; matching modules
            get plain (unpreconditioned, unclipped) gradient steps.
        loss_reduction: ``"mean"`` if the captured loss averages over the batch, ``"sum"``
            if it sums.
        stats_batch_size: take statistics from the first this-many examples of a captured
            batch only (cheaper factors, noisier estimates); ``None`` uses all.
        weight_sharing: how layers applied at many positions (convolutions, dense layers
            on sequences) are factored: ``"expand"`` (KFC, Grosse & Martens 2016) or
            ``"reduce"`` (K-FAC-reduce, Eschenhagen et al. 2023: positions are averaged
            per example first; much cheaper for convolutions).
        curvature_options: keyword arguments for the curvature blocks of dense and conv
            layers, e.g. ``{"damping_rule": "factored"}`` for K-FAC.
        statistics_dtype: the dtype in which statistics are kept, decomposed and applied
            (inputs and gradients captured in bfloat16 under autocast are converted);
            default float32, or float64 for a float64 model.
        grad_worker_fraction: under ``torch.distributed``, the fraction of ranks that
            hold each layer's decomposition and precondition its gradient (KAISA; see
            :mod:`ngrl.distributed`): 1 (default) sends every decomposition to every
            rank, ``1/world`` keeps each on one rank and broadcasts the preconditioned
            gradient instead.

    Under ``torch.distributed`` (a process group of several ranks, each with its own
    data), gradients are averaged before each step and curvature statistics after each
    capture, each in one all-reduce, and each layer's decomposition is computed by one
    rank: the ranks take identical steps. Without a process group nothing changes.

    Every float hyperparameter (and the two step counts) may instead be a callable
    ``f(step) -> value``. ``lr`` and the rest are read from ``param_groups[0]`` on every
    step, so ``torch.optim.lr_scheduler`` and Stable-Baselines3 can change them.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: Schedule = 0.25,
        damping: Schedule = 1e-2,
        kl_clip: Schedule | None = 1e-3,
        momentum: Schedule = 0.9,
        dampening: Schedule = 0.0,
        weight_decay: Schedule = 0.0,
        factor_decay: Schedule = 0.95,
        factor_update_steps: int | Callable[[int], int] = 1,
        inv_update_steps: int | Callable[[int], int] = 10,
        curvature: str = "kfac",
        skip_layers: Sequence[str] | str = (),
        loss_reduction: Reduction = "mean",
        stats_batch_size: int | None = None,
        weight_sharing: WeightSharing = "expand",
        curvature_options: Mapping[str, Any] | None = None,
        grad_worker_fraction: float = 1.0,
        statistics_dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"KFAC takes the model (an nn.Module) to attach its hooks, got {type(model)}"
            )
        defaults: dict[str, Any] = dict(
            lr=lr,
            damping=damping,
            kl_clip=kl_clip,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            factor_decay=factor_decay,
            factor_update_steps=factor_update_steps,
            inv_update_steps=inv_update_steps,
        )
        for name, value in defaults.items():
            if value is not None and not callable(value):
                check(name, value)
        check_choice("loss_reduction", loss_reduction, ("mean", "sum"))
        check_choice("weight_sharing", weight_sharing, ("expand", "reduce"))
        if stats_batch_size is not None:
            check("stats_batch_size", stats_batch_size)
        block_class = get_block_class(curvature)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                f"Invalid model: {type(model).__name__} has no trainable parameters, "
                "so there is nothing for K-FAC to precondition"
            )
        if statistics_dtype is not None and not (
            isinstance(statistics_dtype, torch.dtype) and statistics_dtype.is_floating_point
        ):
            raise ValueError(
                f"Invalid statistics_dtype: {statistics_dtype!r} (a floating torch.dtype)"
            )
        super().__init__(params, defaults)
        self.param_groups[0]["step"] = 0
        #: The dtype of every statistic, decomposition and preconditioned gradient,
        #: whatever the dtype of the forward pass (bf16 autocast, a half-precision model).
        self.statistics_dtype = statistics_dtype or torch.promote_types(
            params[0].dtype, torch.float32
        )
        if isinstance(skip_layers, str):
            skip_layers = (skip_layers,)
        self.curvature = curvature
        self.layers: list[Layer] = find_layers(model, skip_layers)
        options = dict(curvature_options or {})
        try:
            self.blocks: dict[str, CurvatureBlock] = {
                layer.name: (
                    block_class(layer.shape, **options)
                    if layer.kronecker
                    else DiagonalBlock(layer.shape)
                )
                for layer in self.layers
            }
        except TypeError as error:
            raise ValueError(
                f"Invalid curvature_options for {curvature!r}: {options} ({error})"
            ) from None
        self._block_options = options
        self._capture = Capture(
            self.layers, self._sink, loss_reduction, stats_batch_size, weight_sharing
        )
        self._warned_uncaptured = False
        #: The trust-region scale ``ν`` of the last step (one per part for step_parts).
        self.trust_region_scales: list[float] = []
        self.grad_worker_fraction = distributed.check_grad_worker_fraction(grad_worker_fraction)
        self._groups: distributed.Groups | None = None

    # --- hyperparameters --------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Number of parameter updates taken so far."""
        return int(self.param_groups[0]["step"])

    def hyperparameter(self, name: str) -> Any:
        """The current value of a hyperparameter of ``param_groups[0]``, schedules applied."""
        return resolve(name, self.param_groups[0][name], self.steps)

    @property
    def capture_due(self) -> bool:
        """Whether this step should capture statistics (every ``factor_update_steps``)."""
        return self.steps % int(self.hyperparameter("factor_update_steps")) == 0

    # --- statistics -------------------------------------------------------------------
    @contextmanager
    def capture(self) -> Iterator[None]:
        """Take curvature statistics from the backward passes run inside this context.

        The statistics of all those passes form one batch, folded into the running
        factors when the context exits; if any of them is not finite, the whole batch is
        dropped with a warning and the factors stay as they were.
        """
        try:
            with self._capture.active():
                yield
        except BaseException:
            for block in self.blocks.values():
                block.discard()
            raise
        with self._exact_dtype():
            self._commit_statistics()

    def _commit_statistics(self) -> None:
        finite = all(block.pending_is_finite() for block in self.blocks.values())
        if distributed.is_distributed():
            finite = distributed.all_agree(finite)
        if finite:
            decay = float(self.hyperparameter("factor_decay"))
            for block in self.blocks.values():
                block.commit(decay)
            if self._work_plan() is not None:  # checks the blocks, once
                distributed.all_reduce_mean(
                    [t for block in self.blocks.values() for t in block.running_statistics()]
                )
        else:
            for block in self.blocks.values():
                block.discard()
            warnings.warn(
                "K-FAC: non-finite curvature statistics were captured and dropped; "
                "the factors are unchanged",
                RuntimeWarning,
                stacklevel=4,  # the caller's `with opt.capture():` line
            )

    def capture_backward(self, loss: Tensor, retain_graph: bool = True) -> None:
        """Capture statistics from ``loss`` with a backward pass that computes only them.

        Equivalent to ``with opt.capture(): loss.backward(retain_graph=...)`` but leaves
        ``.grad`` untouched and skips the weight gradients of dense and conv layers, which
        the statistics do not need (roughly half of a convolutional backward pass). Falls
        back to the full backward pass (which does fill ``.grad``) when a layer's output
        was modified in place. Assumes each layer is applied once per forward pass; for
        layers applied several times (recurrent cells), use ``capture()`` and ``backward()``.
        """
        with self.capture():
            targets = self._capture.gradient_targets()
            if targets is None:
                loss.backward(retain_graph=retain_graph)
            else:
                torch.autograd.grad(loss, targets, retain_graph=retain_graph, allow_unused=True)

    def remove_hooks(self) -> None:
        """Detach this optimizer's hooks from the model (no statistics can be taken after)."""
        self._capture.remove()

    def _sink(self, layer: Layer, a: Tensor | None, g: Tensor) -> None:
        dtype = self.statistics_dtype
        with self._exact_dtype():
            self.blocks[layer.name].accumulate(None if a is None else a.to(dtype), g.to(dtype))

    def _exact_dtype(self) -> torch.autocast:
        """Statistics are formed in :attr:`statistics_dtype`, also inside an autocast region."""
        device = self.param_groups[0]["params"][0].device.type
        return torch.autocast(device, enabled=False)

    # --- the update -------------------------------------------------------------------
    @torch.no_grad()
    def _directions(
        self, damping: float, refresh: bool | None = None
    ) -> list[tuple[list[Tensor], list[Tensor], float]] | None:
        """Per layer: its parameters, their preconditioned gradients ``X`` and ``⟨X, ∇Ŵ⟩``;
        ``None`` if any is not finite. ``refresh``: recompute the decompositions first
        (default: when this step is due, every ``inv_update_steps``)."""
        if refresh is None:
            refresh = self.steps % int(self.hyperparameter("inv_update_steps")) == 0
        plan = self._work_plan()
        me = distributed.rank()
        active: dict[str, tuple[Layer, Tensor]] = {}
        uncaptured = []
        for layer in self.layers:
            grads = [p.grad for p in layer.params]
            if all(g is None for g in grads):
                continue
            if not self.blocks[layer.name].initialized:
                uncaptured.append(layer.name or type(layer.module).__name__)
                continue
            active[layer.name] = (layer, layer.gather(grads).to(self.statistics_dtype))
        shared = [name for name in active if plan is not None and name in plan.owners]
        if refresh and shared:
            assert plan is not None and self._groups is not None
            distributed.share_from_owners(
                shared,
                plan,
                self._groups,
                produce=lambda name: self._refreshed(name, damping),
                consume=lambda name, tensors: self.blocks[name].load_decomposition(tensors),
                device=self.param_groups[0]["params"][0].device,
            )
        preconditioned: dict[str, Tensor] = {}
        for name, (_, grad) in active.items():
            if name in shared:
                assert plan is not None
                if plan.is_grad_worker(name, me):
                    preconditioned[name] = self.blocks[name].precondition(grad, damping)
                continue
            if refresh:
                self.blocks[name].refresh(damping)
            preconditioned[name] = self.blocks[name].precondition(grad, damping)
        if shared and plan is not None and plan.grad_workers < plan.world:
            assert self._groups is not None
            first = self.param_groups[0]["params"][0]
            preconditioned = distributed.share_with_row(
                shared,
                plan,
                self._groups,
                preconditioned,
                {name: active[name][0].shape for name in shared},
                first.device,
                first.dtype,
            )
        terms = [
            (preconditioned[name] * grad).sum().to(torch.float64)
            for name, (_, grad) in active.items()
        ]
        if uncaptured and not self._warned_uncaptured:
            self._warned_uncaptured = True
            warnings.warn(
                "K-FAC: no curvature statistics yet for "
                f"{', '.join(uncaptured)}; taking plain gradient steps there until a "
                "backward pass runs inside `with optimizer.capture():`",
                RuntimeWarning,
                stacklevel=3,
            )
        # With finite gradients, the sum is finite exactly when every X is (a NaN or an
        # infinity in X makes its term NaN or infinite), so one check covers them all.
        quadratics = torch.stack(terms).tolist() if terms else []
        if not math.isfinite(math.fsum(quadratics)):
            return None
        return [
            (
                layer.params,
                [
                    x.to(p.dtype)
                    for x, p in zip(layer.scatter(preconditioned[name]), layer.params, strict=True)
                ],
                quadratic,
            )
            for (name, (layer, _)), quadratic in zip(active.items(), quadratics, strict=True)
        ]

    # --- data parallelism (ngrl.distributed) -------------------------------------------
    def _check_rank_averaged(self) -> None:
        unsupported = sorted(
            {type(b).__name__ for b in self.blocks.values() if not b.rank_averaged}
        )
        if unsupported:
            raise ValueError(
                f"Invalid curvature for torch.distributed: {self.curvature!r} "
                f"({', '.join(unsupported)}) keeps statistics that cannot be averaged over "
                "ranks; use kfac, tkfac, shampoo or diag"
            )

    def _work_plan(self) -> distributed.WorkPlan | None:
        """KAISA's assignment of the layers whose decompositions can be sent (built once)."""
        if not distributed.is_distributed():
            return None
        if self._groups is None:
            self._check_rank_averaged()
            costs = {
                layer.name: float(sum(d**3 for d in layer.shape))
                for layer in self.layers
                if self.blocks[layer.name].shares_decomposition
            }
            plan = distributed.WorkPlan.build(
                costs, distributed.world_size(), self.grad_worker_fraction
            )
            self._groups = distributed.Groups(plan)
        return self._groups.plan

    def _refreshed(self, name: str, damping: float) -> list[Tensor] | None:
        block = self.blocks[name]
        block.refresh(damping)
        return block.decomposition()

    def _gradients_finite(self) -> bool:
        grads = [p.grad for p in self.param_groups[0]["params"] if p.grad is not None]
        return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def _skip(self, what: str) -> None:
        warnings.warn(
            f"K-FAC: non-finite {what}; this step was skipped and nothing was changed",
            RuntimeWarning,
            stacklevel=3,
        )

    def _clipped_directions(
        self, lr: float, kl_clip: float | None, refresh: bool | None = None
    ) -> dict[Tensor, Tensor] | None:
        """``ν·X`` for every preconditioned parameter (``ν`` from radius ``kl_clip``), or
        ``None`` (with a warning) when the gradients or the preconditioned gradients are
        not finite. The scale is kept in :attr:`trust_region_scales`."""
        distributed.average_gradients(self.param_groups[0]["params"])
        if not self._gradients_finite():
            self._skip("gradients")
            return None
        with self._exact_dtype():
            found = self._directions(float(self.hyperparameter("damping")), refresh)
        if found is None:
            self._skip("preconditioned gradients")
            return None
        quadratic = math.fsum(q for _, _, q in found)
        scale = kl_clip_scale(quadratic, lr, kl_clip)
        self.trust_region_scales.append(scale)
        return {
            param: x.mul_(scale)
            for params, xs, _ in found
            for param, x in zip(params, xs, strict=True)
        }

    @torch.no_grad()
    def precondition_(self) -> bool:
        """Replace each ``p.grad`` by its clipped natural gradient ``ν·X`` in place.

        For use in the kfac-pytorch style, before another optimizer's ``step()``.
        Returns ``False`` (and changes nothing) when gradients or results are not finite.
        """
        self.trust_region_scales = []
        lr = float(self.hyperparameter("lr"))
        directions = self._clipped_directions(lr, self.hyperparameter("kl_clip"))
        if directions is None:
            return False
        for param, direction in directions.items():
            assert param.grad is not None
            param.grad.copy_(direction)
        self.param_groups[0]["step"] += 1
        return True

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One K-FAC update; returns the closure's loss (if a closure is given)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.trust_region_scales = []
        lr = float(self.hyperparameter("lr"))
        directions = self._clipped_directions(lr, self.hyperparameter("kl_clip"))
        if directions is not None:
            self._update(directions, lr)
        return loss

    @torch.no_grad()
    def step_parts(self, parts: Sequence[tuple[Sequence[Tensor | None], float | None]]) -> bool:
        r"""One K-FAC update of a gradient given as parts, each with its own trust region.

        ``parts`` holds, per part, the gradients of ``param_groups[0]["params"]`` (in that
        order; ``None`` where a part does not reach a parameter) and its radius ``δ_i``::

            X_i = (F̂ + λI)⁻¹ ∇_i,   ν_i = min(1, sqrt(δ_i / (lr² Σ⟨X_i, ∇_i⟩))),
            d   = Σ_i ν_i X_i        (then weight decay and momentum as in step()).

        With an actor-critic's policy and value losses as the parts, the critic's share of
        one joint quadratic can no longer shrink the policy's step. One part with the
        ``kl_clip`` radius is :meth:`step`. The parameters' ``.grad`` end as the parts'
        sum. Returns ``False`` (the parameters and the momentum untouched, with the usual
        warning) when a part is not finite.
        """
        params = self.param_groups[0]["params"]
        lr = float(self.hyperparameter("lr"))
        self.trust_region_scales = []
        total: dict[Tensor, Tensor] = {}
        directions: dict[Tensor, Tensor] = {}
        for index, (grads, kl_clip) in enumerate(parts):
            for param, grad in zip(params, grads, strict=True):
                param.grad = None if grad is None else grad.detach().clone()
            # The decompositions are refreshed (when due) for the first part only.
            found = self._clipped_directions(lr, kl_clip, refresh=None if index == 0 else False)
            if found is None:
                return False
            for param in params:
                if param.grad is not None:
                    total[param] = total[param] + param.grad if param in total else param.grad
            for param, direction in found.items():
                directions[param] = (
                    directions[param] + direction if param in directions else direction
                )
        for param in params:
            param.grad = total.get(param)
        self._update(directions, lr)
        return True

    def _update(self, directions: dict[Tensor, Tensor], lr: float) -> None:
        """``Ŵ ← Ŵ − lr·m`` with ``m ← μ·m + (1 − dampening)·(d + weight_decay·Ŵ)``; ``d``
        is the clipped natural gradient where there is one, the plain gradient elsewhere."""
        momentum = float(self.hyperparameter("momentum"))
        dampening = float(self.hyperparameter("dampening"))
        weight_decay = float(self.hyperparameter("weight_decay"))
        for param in self.param_groups[0]["params"]:
            if param.grad is None:
                continue
            d = directions.get(param, param.grad)
            if weight_decay != 0.0:
                d = d.add(param, alpha=weight_decay)
            if momentum != 0.0:
                state = self.state[param]
                buffer = state.get("momentum_buffer")
                if buffer is None:
                    buffer = state["momentum_buffer"] = torch.zeros_like(d)
                buffer.mul_(momentum).add_(d, alpha=1.0 - dampening)
                d = buffer
            param.add_(d, alpha=-lr)
        self.param_groups[0]["step"] += 1

    # --- checkpoints ------------------------------------------------------------------
    _STEP_KEYS = ("momentum_buffer",)  # what step() keeps per parameter, beside the blocks
    _DERIVED_KEY = "derived"  # a block's derived_state(), in its layer's entry

    def _param_index(self) -> dict[int, int]:
        return {id(p): i for i, p in enumerate(self.param_groups[0]["params"])}

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus each block's running statistics (not inverses).

        A layer's statistics live in the state entry of its first parameter, under the
        block's own keys (``a_factor`` and ``g_factor`` for K-FAC).
        """
        state = super().state_dict()
        index = self._param_index()
        # Between two refreshes the next steps use decompositions of older statistics:
        # they travel too, so that a resumed run continues bit for bit.
        between = self.steps % int(self.hyperparameter("inv_update_steps")) != 0
        for layer in self.layers:
            block = self.blocks[layer.name]
            block_state: dict[str, Any] = block.state_dict()
            derived = block.derived_state() if between and block_state else {}
            if derived:
                block_state[self._DERIVED_KEY] = derived
            if block_state:
                state["state"].setdefault(index[id(layer.params[0])], {}).update(block_state)
        state["curvature"] = self.curvature
        return state

    def _check_curvature(self, state_dict: dict[str, Any]) -> None:
        """Refuse the state of another curvature (its statistics would be misread or left
        as stray entries), also from a checkpoint that predates the ``curvature`` key."""
        saved = state_dict.get("curvature")
        if saved is not None and saved != self.curvature:
            raise ValueError(
                f"Invalid state_dict: it holds {saved!r} curvature statistics, and this "
                f"optimizer uses {self.curvature!r}; build the optimizer with "
                f"curvature={saved!r} to load it"
            )
        index = self._param_index()
        for layer in self.layers:
            entry = state_dict.get("state", {}).get(index[id(layer.params[0])], {})
            known = {*self._STEP_KEYS, self._DERIVED_KEY, *self.blocks[layer.name].state_keys}
            stray = sorted(set(entry) - known)
            if stray:
                raise ValueError(
                    f"Invalid state_dict: layer {layer.name or '<root>'!r} has entries "
                    f"{', '.join(stray)} that {self.curvature!r} curvature does not keep "
                    "(a state of another curvature?)"
                )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; a checkpoint that does not fit changes nothing.

        Together with the statistics come the decompositions in use when the state was
        taken between two refreshes, so a round trip at any step continues bit for bit.
        """
        self._check_curvature(state_dict)
        index = self._param_index()
        saved = state_dict.get("state", {})
        restored: dict[str, tuple[dict[str, Tensor], dict[str, Any]]] = {}
        for layer in self.layers:
            entry = saved.get(index[id(layer.params[0])], {})
            block = self.blocks[layer.name]
            block_state = {k: v for k, v in entry.items() if k in block.state_keys}
            derived = entry.get(self._DERIVED_KEY, {})
            # Validate on a fresh block so that a bad checkpoint leaves this one untouched.
            options = self._block_options if layer.kronecker else {}
            fresh = type(block)(layer.shape, **options)
            fresh.load_state_dict(block_state)
            fresh.load_derived_state(derived)
            restored[layer.name] = (block_state, derived)
        super().load_state_dict(state_dict)
        for layer in self.layers:
            block_state, derived = restored[layer.name]
            entry = self.state.get(layer.params[0], {})
            for key in (*block_state, self._DERIVED_KEY):
                entry.pop(key, None)
            if not entry and layer.params[0] in self.state:
                del self.state[layer.params[0]]
            device = layer.params[0].device
            block = self.blocks[layer.name]
            block.load_state_dict({k: v.to(device) for k, v in block_state.items()})
            block.load_derived_state(derived, device)
        self._warned_uncaptured = False
