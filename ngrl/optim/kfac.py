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
from ngrl.capture import Capture, Reduction
from ngrl.curvature.base import CurvatureBlock, get_block_class
from ngrl.curvature.dense import DenseBlock
from ngrl.curvature.diagonal import DiagonalBlock
from ngrl.curvature.embedding import EmbeddingBlock
from ngrl.curvature.recurrent_chain import RecurrentChainBlock
from ngrl.layers import (
    EmbeddingLayer,
    GenericLayer,
    Layer,
    RecurrentLayer,
    ScaleShiftLayer,
    WeightSharing,
    find_layers,
)
from ngrl.linalg import all_finite, conjugate_gradient
from ngrl.optim.config import SCHEDULABLE, KFACConfig, RecurrentModel, ScaleShiftBlock
from ngrl.optim.conjugate_gradient import fisher_vector_product
from ngrl.optim.hyperparams import Schedule, resolve
from ngrl.optim.trust_region import kl_clip_scale

__all__ = ["KFAC", "CurvatureFallbackWarning"]


class CurvatureFallbackWarning(UserWarning):
    """A layer of the model has no Kronecker-factored or exact block and falls back to a
    diagonal one (:attr:`KFAC.fallbacks`)."""


#: The curvature options the embedding and recurrent-chain blocks take from
#: ``curvature_options``; the others belong to the dense and conv layers' blocks.
EMBEDDING_OPTIONS = ("damping_rule", "float64_max_dim")
CHAIN_OPTIONS = ("float64_max_dim",)


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

    Given the exact curvature as a scalar ``divergence`` whose Hessian it is
    (``step(divergence=...)``, e.g. ``mean KL(π_old ‖ π_θ)`` on the batch, as in TRPO),
    ``cg_steps > 0`` refines ``X`` by conjugate gradient on ``(∇²divergence + λI) X = ∇Ŵ``
    over all the layers together, preconditioned by the blocks' ``(F̂ + λI)⁻¹``: its
    first iterate is K-FAC's ``X`` rescaled, and each further one takes the layers'
    interactions and the factorisation's error into account (one Hessian-vector product
    each). The trust region's quadratic is then the exact curvature's.

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
        cg_steps: conjugate-gradient iterations on the exact curvature, preconditioned by
            K-FAC, in each step given a ``divergence`` (0: K-FAC's ``X`` as it is); a
            callable ``f(step)`` changes it during training (K-FAC's own step first).
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
        scale_shift: the block of the affine ``(γ, β)`` of ``nn.LayerNorm``,
            ``nn.GroupNorm`` and batch-norm layers, from their exact per-example gradients:
            ``"full"`` (the dense Fisher block, :class:`ngrl.curvature.DenseBlock`) or
            ``"diagonal"``.
        recurrent: how the time steps of ``nn.RNN``/``nn.GRU``/``nn.LSTM`` maps are
            modelled: ``"independent"`` (K-FAC-expand over time, with the chosen
            curvature) or ``"chain"`` (Martens, Ba & Johnson 2018's chain of correlated
            steps, :class:`ngrl.curvature.RecurrentChainBlock`).
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
        cg_steps: int | Callable[[int], int] = 0,
        skip_layers: Sequence[str] | str = (),
        loss_reduction: Reduction = "mean",
        stats_batch_size: int | None = None,
        weight_sharing: WeightSharing = "expand",
        scale_shift: ScaleShiftBlock = "full",
        recurrent: RecurrentModel = "independent",
        curvature_options: Mapping[str, Any] | None = None,
        grad_worker_fraction: float = 1.0,
        statistics_dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"KFAC takes the model (an nn.Module) to attach its hooks, got {type(model)}"
            )
        config = KFACConfig(
            lr=lr,
            damping=damping,
            kl_clip=kl_clip,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            factor_decay=factor_decay,
            factor_update_steps=factor_update_steps,
            inv_update_steps=inv_update_steps,
            curvature=curvature,
            cg_steps=cg_steps,
            skip_layers=skip_layers,  # type: ignore[arg-type]
            loss_reduction=loss_reduction,
            stats_batch_size=stats_batch_size,
            weight_sharing=weight_sharing,
            scale_shift=scale_shift,
            recurrent=recurrent,
            curvature_options=curvature_options or {},
            grad_worker_fraction=grad_worker_fraction,
            statistics_dtype=statistics_dtype,
        )
        self._block_class = get_block_class(config.curvature)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                f"Invalid model: {type(model).__name__} has no trainable parameters, "
                "so there is nothing for K-FAC to precondition"
            )
        defaults = {name: getattr(config, name) for name in SCHEDULABLE}
        super().__init__(params, defaults)
        self.param_groups[0]["step"] = 0
        #: The dtype of every statistic, decomposition and preconditioned gradient,
        #: whatever the dtype of the forward pass (bf16 autocast, a half-precision model).
        self.statistics_dtype = config.statistics_dtype or torch.promote_types(
            params[0].dtype, torch.float32
        )
        self._config = config
        self.curvature = config.curvature
        self.layers: list[Layer] = find_layers(model, config.skip_layers)
        self._block_options = dict(config.curvature_options)
        try:
            self.blocks: dict[str, CurvatureBlock] = {
                layer.name: self._block_for(layer) for layer in self.layers
            }
        except TypeError as error:
            raise ValueError(
                f"Invalid curvature_options for {config.curvature!r}: "
                f"{self._block_options} ({error})"
            ) from None
        #: Every layer of a type without a Kronecker-factored or exact block, with the
        #: block it falls back to; reported once with a :class:`CurvatureFallbackWarning`
        #: (free parameters of a container, such as SB3's ``log_std``, are listed only).
        self.fallbacks: dict[str, str] = {
            layer.name: f"{type(self.blocks[layer.name]).__name__} ({type(layer.module).__name__})"
            for layer in self.layers
            if isinstance(layer, GenericLayer)
        }
        reported = [
            f"{layer.name or '<root>'} ({type(layer.module).__name__})"
            for layer in self.layers
            if isinstance(layer, GenericLayer) and not layer.free_parameters
        ]
        if reported:
            warnings.warn(
                f"K-FAC has no Kronecker-factored block for {', '.join(reported)}: they take "
                "a diagonal block (averaged squared gradients); see KFAC.fallbacks",
                CurvatureFallbackWarning,
                stacklevel=2,
            )
        self._capture = Capture(
            self.layers,
            self._sink,
            config.loss_reduction,
            config.stats_batch_size,
            config.weight_sharing,
        )
        self._warned_uncaptured = False
        #: The step at which each layer's decomposition was last recomputed.
        self._refreshed: dict[str, int] = {}
        #: The trust-region scale ``ν`` of the last step (one per part for step_parts).
        self.trust_region_scales: list[float] = []
        self.grad_worker_fraction = config.grad_worker_fraction
        self._plan: distributed.LocalPlan | None = None

    def _block_for(self, layer: Layer) -> CurvatureBlock:
        """The chosen curvature for dense and conv layers and the maps of recurrent layers
        (with ``recurrent="chain"``, the chain block for the latter); K-FAC with a diagonal
        input factor for embeddings (with the curvature's damping options); the full or
        diagonal block for a normalisation layer's affine part; a diagonal block for any
        other layer."""
        if isinstance(layer, RecurrentLayer) and self._config.recurrent == "chain":
            return RecurrentChainBlock(layer.shape, **self._options_among(CHAIN_OPTIONS))
        if layer.kronecker:
            return self._block_class(layer.shape, **self._block_options)
        if isinstance(layer, EmbeddingLayer):
            return EmbeddingBlock(layer.shape, **self._options_among(EMBEDDING_OPTIONS))
        if isinstance(layer, ScaleShiftLayer) and self._config.scale_shift == "full":
            return DenseBlock(layer.shape)
        return DiagonalBlock(layer.shape)

    def _options_among(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The given ``curvature_options`` among ``names`` (for a layer-specific block)."""
        return {k: v for k, v in self._block_options.items() if k in names}

    @classmethod
    def from_config(cls, model: nn.Module, config: KFACConfig) -> KFAC:
        """The optimizer of ``model`` with every argument from ``config``."""
        return cls(model, **config.kwargs())

    @property
    def config(self) -> KFACConfig:
        """The optimizer's arguments, with the current values of those that
        ``param_groups[0]`` carries (which schedulers and agents may change)."""
        group = self.param_groups[0]
        return self._config.replace(**{name: group[name] for name in SCHEDULABLE})

    # --- hyperparameters --------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Number of parameter updates taken so far."""
        return int(self.param_groups[0]["step"])

    def hyperparameter(self, name: str) -> Any:
        """The current value of a hyperparameter of ``param_groups[0]``, schedules applied."""
        return resolve(name, self.param_groups[0][name], self.steps)

    @property
    def cg_steps(self) -> int:
        """The conjugate-gradient iterations of this step (its schedule applied)."""
        return int(self.hyperparameter("cg_steps"))

    @property
    def capture_due(self) -> bool:
        """Whether this step should capture statistics (every ``factor_update_steps``)."""
        return self.steps % int(self.hyperparameter("factor_update_steps")) == 0

    # --- statistics -------------------------------------------------------------------
    @contextmanager
    def capture(self, examples: int | None = None) -> Iterator[None]:
        """Take curvature statistics from the backward passes run inside this context.

        The statistics of all those passes form one batch, folded into the running
        factors when the context exits; if any of them is not finite, the whole batch is
        dropped with a warning and the factors stay as they were. ``examples``: the number
        of terms the (mean-reduced) loss averages, when a layer sees another batch size
        (a recurrent layer run one time step at a time); by default each layer's own.
        """
        if examples is not None and (
            isinstance(examples, bool) or not isinstance(examples, int) or examples < 1
        ):
            raise ValueError(f"Invalid examples value: {examples!r} (an integer >= 1, or None)")
        try:
            with self._capture.active(examples):
                yield
        except BaseException:
            for block in self.blocks.values():
                block.discard()
            raise
        with self._exact_dtype():
            self._commit_statistics()

    def _commit_statistics(self) -> None:
        plan = self._work_plan()
        if plan.agree(all(block.pending_is_finite() for block in self.blocks.values())):
            decay = float(self.hyperparameter("factor_decay"))
            for block in self.blocks.values():
                block.commit(decay)
            plan.average_statistics(self.blocks.values())
        else:
            for block in self.blocks.values():
                block.discard()
            warnings.warn(
                "K-FAC: non-finite curvature statistics were captured and dropped; "
                "the factors are unchanged",
                RuntimeWarning,
                stacklevel=4,  # the caller's `with opt.capture():` line
            )

    @contextmanager
    def no_statistics(self) -> Iterator[None]:
        """Forward passes inside this context prepare nothing for statistics, for passes
        whose backward will not be captured: layers keep no outputs, recurrent modules
        run their fused kernels instead of the step-by-step recomputation (the same values
        and gradients, at a fraction of the time), and attention modules their own forward."""
        previous = self._capture.paused
        self._capture.paused = True
        try:
            yield
        finally:
            self._capture.paused = previous

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
            if a is not None and a.is_floating_point():  # an embedding's indices stay integers
                a = a.to(dtype)
            self.blocks[layer.name].accumulate(a, g.to(dtype))

    def _exact_dtype(self) -> torch.autocast:
        """Statistics are formed in :attr:`statistics_dtype`, also inside an autocast region."""
        device = self.param_groups[0]["params"][0].device.type
        return torch.autocast(device, enabled=False)

    # --- the update -------------------------------------------------------------------
    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Tensor] | None = None, *, divergence: Tensor | None = None
    ) -> Tensor | None:
        """One K-FAC update; returns the closure's loss (if a closure is given).

        The stages, in order (:meth:`_natural_gradient`, then :meth:`_update`): average
        the gradients over the ranks, refresh the decompositions when due, precondition
        each layer (refined by ``cg_steps`` of conjugate gradient on the Hessian of
        ``divergence``, if given, with its graph), scale by the trust region, momentum
        update. The statistics were committed (and averaged over the ranks) when their
        ``capture()`` context closed.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.trust_region_scales = []
        lr = float(self.hyperparameter("lr"))
        directions = self._natural_gradient(
            lr, self.hyperparameter("kl_clip"), divergence=divergence
        )
        if directions is not None:
            self._update(directions, lr)
        return loss

    @torch.no_grad()
    def precondition_(self, divergence: Tensor | None = None) -> bool:
        """Replace each ``p.grad`` by its clipped natural gradient ``ν·X`` in place.

        For use in the kfac-pytorch style, before another optimizer's ``step()``.
        Returns ``False`` (and changes nothing) when gradients or results are not finite.
        ``divergence``: as in :meth:`step`.
        """
        self.trust_region_scales = []
        lr = float(self.hyperparameter("lr"))
        directions = self._natural_gradient(
            lr, self.hyperparameter("kl_clip"), divergence=divergence
        )
        if directions is None:
            return False
        for param, direction in directions.items():
            assert param.grad is not None
            param.grad.copy_(direction)
        self.param_groups[0]["step"] += 1
        return True

    @torch.no_grad()
    def step_parts(
        self,
        parts: Sequence[tuple[Sequence[Tensor | None], float | None]],
        divergence: Tensor | None = None,
    ) -> bool:
        r"""One K-FAC update of a gradient given as parts, each with its own trust region.

        ``parts`` holds, per part, the gradients of ``param_groups[0]["params"]`` (in that
        order; ``None`` where a part does not reach a parameter) and its radius ``δ_i``::

            X_i = (F̂ + λI)⁻¹ ∇_i,   ν_i = min(1, sqrt(δ_i / (lr² Σ⟨X_i, ∇_i⟩))),
            d   = Σ_i ν_i X_i        (then weight decay and momentum as in step()).

        With an actor-critic's policy and value losses as the parts, the critic's share of
        one joint quadratic can no longer shrink the policy's step. One part with the
        ``kl_clip`` radius is :meth:`step`. The parameters' ``.grad`` end as the parts'
        sum. Returns ``False`` (the parameters and the momentum untouched, with the usual
        warning) when a part is not finite. ``divergence``: as in :meth:`step`, for every
        part.
        """
        params = self.param_groups[0]["params"]
        lr = float(self.hyperparameter("lr"))
        self.trust_region_scales = []
        total: dict[Tensor, Tensor] = {}
        directions: dict[Tensor, Tensor] = {}
        for part, kl_clip in parts:
            for param, grad in zip(params, part, strict=True):
                param.grad = None if grad is None else grad.detach().clone()
            # A layer that several parts reach is refreshed (when due) for the first.
            found = self._natural_gradient(lr, kl_clip, divergence)
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

    # --- the stages of a step -------------------------------------------------------------
    def _natural_gradient(
        self, lr: float, kl_clip: float | None, divergence: Tensor | None = None
    ) -> dict[Tensor, Tensor] | None:
        """``ν·X`` per parameter: the stages of a step up to the update, in order. ``None``
        (with a warning, nothing changed) if a gradient or a preconditioned gradient is not
        finite."""
        cg_steps = self.cg_steps  # this step's count, its schedule evaluated once
        if cg_steps > 0 and divergence is None:
            raise ValueError(
                f"K-FAC with cg_steps={cg_steps} refines each step on the exact "
                "curvature: pass it as step(divergence=...), a scalar whose Hessian it is "
                "(e.g. the mean KL between the model's predictive and a detached copy)"
            )
        grads = self._layer_gradients()  # averaged over the ranks
        if grads is None:
            return None
        if divergence is not None and cg_steps > 0:
            self._refresh_due(grads)
            directions = self._refined(grads, divergence, cg_steps)
        else:
            directions = self._preconditioned(grads, refresh=True)
        quadratic = self._quadratic(directions, grads)
        if quadratic is None:
            return None
        return self._scaled(directions, self._trust_region_scale(quadratic, lr, kl_clip))

    def _refresh_due(self, grads: Mapping[str, Tensor]) -> None:
        """Recompute the decompositions of the layers of ``grads`` when they are due, each
        once per step."""
        if self.steps % int(self.hyperparameter("inv_update_steps")) != 0:
            return
        stale = {
            name: self.blocks[name] for name in grads if self._refreshed.get(name) != self.steps
        }
        if stale:
            with self._exact_dtype():
                self._work_plan().refresh(stale, float(self.hyperparameter("damping")))
            self._refreshed.update(dict.fromkeys(stale, self.steps))

    def _refined(
        self, grads: Mapping[str, Tensor], divergence: Tensor, cg_steps: int
    ) -> dict[str, Tensor]:
        """``X`` of ``(∇²divergence + λI) X = ∇Ŵ`` after ``cg_steps`` iterations of conjugate
        gradient from zero, preconditioned by :meth:`_preconditioned` (the products averaged
        over the ranks, like the gradients)."""
        layers = [layer for layer in self.layers if layer.name in grads]
        params = [p for layer in layers for p in layer.params]
        dtype = self.statistics_dtype

        def flat(per_layer: Mapping[str, Tensor]) -> Tensor:
            return torch.cat(
                [t.reshape(-1) for layer in layers for t in layer.scatter(per_layer[layer.name])]
            )

        def per_layer(vector: Tensor) -> dict[str, Tensor]:
            pieces = iter(vector.split([p.numel() for p in params]))
            return {
                layer.name: layer.gather([next(pieces).view_as(p) for p in layer.params])
                for layer in layers
            }

        damping = float(self.hyperparameter("damping"))
        with torch.enable_grad():  # a step runs under no_grad; the products differentiate
            exact = fisher_vector_product(divergence, params, damping)

        def product(vector: Tensor) -> Tensor:
            with torch.enable_grad():
                result = exact(vector.to(params[0].dtype))
            distributed.all_reduce_mean([result])
            return result.to(dtype)

        gradient = flat(grads)
        solution = conjugate_gradient(
            product,
            gradient,
            cg_steps,
            # relative: converged to rounding, whatever the gradient's scale
            tolerance=1e-16 * float(gradient @ gradient),
            preconditioner=lambda residual: flat(
                self._preconditioned(per_layer(residual), refresh=False)
            ),
        )
        return per_layer(solution)

    def _preconditioned(self, grads: Mapping[str, Tensor], refresh: bool) -> dict[str, Tensor]:
        """``X = (F̂ + λI)⁻¹ ∇Ŵ`` per layer, refreshing the decompositions first when due."""
        if refresh:
            self._refresh_due(grads)
        plan, damping = self._work_plan(), float(self.hyperparameter("damping"))
        with self._exact_dtype():
            return plan.gather_directions(
                {
                    name: self.blocks[name].precondition(grad, damping)
                    for name, grad in plan.preconditioned_here(grads).items()
                },
                grads,
            )

    @torch.no_grad()
    def natural_gradient(self, grads: Sequence[Tensor | None]) -> list[Tensor | None] | None:
        """``(F̂ + λI)⁻¹ g`` of the gradients ``grads`` of ``param_groups[0]["params"]`` (in
        that order), with the decompositions as they stand: no refresh, trust region,
        momentum or step count, and the parameters' ``.grad`` left as they were. A layer
        without statistics yet passes its gradient through; ``None`` (with a warning) if
        anything is not finite. For measuring a direction, e.g. that of another loss.

        Like :meth:`step`, it averages ``grads`` over the ranks of a process group: under
        torchrun it is a collective call, which every rank must make."""
        params = self.param_groups[0]["params"]
        if len(grads) != len(params):
            raise ValueError(
                f"natural_gradient: grads has {len(grads)} entries, the optimizer "
                f"{len(params)} parameters (param_groups[0]['params'], in order)"
            )
        saved = [p.grad for p in params]
        try:
            for param, grad in zip(params, grads, strict=True):
                param.grad = None if grad is None else grad.detach().clone()
            gathered = self._layer_gradients()
            if gathered is None:
                return None
            directions = self._preconditioned(gathered, refresh=False)
            if not all_finite(*directions.values()):
                self._skip("preconditioned gradients")
                return None
            found = self._scaled(directions, 1.0)
            return [found.get(p, p.grad) for p in params]
        finally:
            for param, grad in zip(params, saved, strict=True):
                param.grad = grad

    def _work_plan(self) -> distributed.LocalPlan:
        """Who refreshes and preconditions which layer (:mod:`ngrl.distributed`; built at
        first use, when a process group, if any, exists)."""
        if self._plan is None:
            device = self.param_groups[0]["params"][0].device
            self._plan = distributed.make_plan(
                self.curvature, self.blocks, self.grad_worker_fraction, device
            )
        return self._plan

    def _layer_gradients(self) -> dict[str, Tensor] | None:
        """``∇Ŵ`` (in :attr:`statistics_dtype`) of every layer that has a gradient and
        statistics, after averaging the gradients over the ranks; ``None`` (with a
        warning) if any gradient is not finite. Layers with a gradient but no statistics
        yet take plain gradient steps (warned about once)."""
        params = self.param_groups[0]["params"]
        self._work_plan().average_gradients(params)
        grads = [p.grad for p in params if p.grad is not None]
        if not all_finite(*grads):
            self._skip("gradients")
            return None
        gathered: dict[str, Tensor] = {}
        uncaptured = []
        for layer in self.layers:
            layer_grads = [p.grad for p in layer.params]
            if all(g is None for g in layer_grads):
                continue
            if not self.blocks[layer.name].initialized:
                uncaptured.append(layer.name or type(layer.module).__name__)
                continue
            gathered[layer.name] = layer.gather(layer_grads).to(self.statistics_dtype)
        if uncaptured and not self._warned_uncaptured:
            self._warned_uncaptured = True
            warnings.warn(
                "K-FAC: no curvature statistics yet for "
                f"{', '.join(uncaptured)}; taking plain gradient steps there until a "
                "backward pass runs inside `with optimizer.capture():`",
                RuntimeWarning,
                stacklevel=6,  # the caller of step()
            )
        return gathered

    def _quadratic(
        self, directions: Mapping[str, Tensor], grads: Mapping[str, Tensor]
    ) -> float | None:
        """``Σ⟨X, ∇Ŵ⟩`` over the layers; ``None`` (with a warning) if it is not finite."""
        terms = [(directions[name] * grad).sum().to(torch.float64) for name, grad in grads.items()]
        # With finite gradients, the sum is finite exactly when every X is (a NaN or an
        # infinity in X makes its term NaN or infinite), so one check covers them all.
        quadratic = math.fsum(torch.stack(terms).tolist()) if terms else 0.0
        if not math.isfinite(quadratic):
            self._skip("preconditioned gradients")
            return None
        return quadratic

    def _trust_region_scale(self, quadratic: float, lr: float, kl_clip: float | None) -> float:
        """``ν`` of the trust region, also kept in :attr:`trust_region_scales`."""
        scale = kl_clip_scale(quadratic, lr, kl_clip)
        self.trust_region_scales.append(scale)
        return scale

    def _scaled(self, directions: Mapping[str, Tensor], scale: float) -> dict[Tensor, Tensor]:
        """``ν·X`` per parameter (each layer's ``X`` split back into its weight and bias)."""
        return {
            param: x.to(param.dtype).mul_(scale)
            for layer in self.layers
            if layer.name in directions
            for param, x in zip(layer.params, layer.scatter(directions[layer.name]), strict=True)
        }

    def _skip(self, what: str) -> None:
        warnings.warn(
            f"K-FAC: non-finite {what}; this step was skipped and nothing was changed",
            RuntimeWarning,
            stacklevel=7,  # the caller of step()
        )

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
            fresh = self._block_for(layer)
            fresh.load_state_dict(block_state)
            fresh.load_derived_state(derived)
            restored[layer.name] = (block_state, derived)
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a state older than a hyperparameter keeps ours
            for name in SCHEDULABLE:
                group.setdefault(name, self.defaults[name])
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
        # A loaded state starts a new record of refreshes.
        self._refreshed = {}
