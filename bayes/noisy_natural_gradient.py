"""Noisy natural gradient: a Gaussian posterior whose precision is a curvature block."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ngrl.bayes.base import VariationalOptimizer
from ngrl.bayes.posterior import BlockPosterior, LayerCovariance
from ngrl.curvature.base import CurvatureBlock, available, get_block_class
from ngrl.layers import Layer
from ngrl.optim.hyperparams import check_choice
from ngrl.optim.trust_region import kl_clip_scale

__all__ = ["FISHERS", "NoisyNaturalGradient", "sampling_curvatures"]

#: Where the statistics come from: the training labels (the empirical Fisher, as VOGN and
#: SLANG take it) or targets drawn from the model (the true Fisher, as the noisy K-FAC
#: paper's code takes it).
FISHERS = ("empirical", "sampled")
#: Each element of a block's derived state is saved as ``f"{DERIVED}{key}.{i}/{layer}"``.
DERIVED = "derived:"


def _probe(name: str, options: Mapping[str, Any]) -> CurvatureBlock:
    """A small block of curvature ``name`` with random statistics, refreshed."""
    generator = torch.Generator().manual_seed(0)
    block = get_block_class(name)((3, 4), **options)
    # Statistics as a dense layer gives them: (N, T, d_in) with the homogeneous coordinate.
    a = torch.randn(8, 1, 4, generator=generator, dtype=torch.float64)
    a[..., -1] = 1.0
    block.accumulate(a, torch.randn(8, 1, 3, generator=generator, dtype=torch.float64))
    block.commit(0.9)
    block.refresh(0.1)
    return block


def _samples(name: str, options: Mapping[str, Any]) -> bool:
    try:
        _probe(name, options).sample_matpower(0.1, -0.5)
    except NotImplementedError:
        return False
    return True


def sampling_curvatures() -> list[str]:
    """The registered curvatures (with their default options) that can draw posterior
    samples: those whose blocks take the matrix power −½."""
    return [name for name in available() if _samples(name, {})]


class NoisyNaturalGradient(VariationalOptimizer):
    r"""Noisy natural gradient (Zhang, Sun, Duvenaud & Grosse 2018, arXiv:1712.02390)
    with any curvature block that takes the matrix powers −1 and −½: noisy K-FAC
    (``"kfac"``), noisy EK-FAC (``"ekfac"``, Bae, Zhang & Grosse 2018), ``"tkfac"``,
    ``"kpsvd"``, ``"diag"``, ``"mfac"``, …

    Per layer, with the block's damped curvature ``F̂_γ = F̂ + γI`` (its damping rule; the
    statistics are per-example gradients, see ``fisher``), ``N = dataset_size /
    kl_weight`` and ``γ = prior_precision/N + damping``:

    .. code-block:: text

        q(Ŵ) = N(M, F̂_γ⁻¹ / N)
        sample:  Ŵ = M + N^{-1/2}·F̂_γ^{-1/2} z,   z ~ N(0, I)
        m ← (1 − w)·m + w·(ĝ + (prior_precision/N)·M)     w = (1 − μ)/(1 − μᵗ)
        Δ = F̂_γ⁻¹ m,   ν = min(1, sqrt(kl_clip / (lr² ⟨Δ, m⟩)))    (ν = 1 without kl_clip)
        M ← M − lr·ν·Δ

    ``F̂_γ`` is the matrix of the block's last refresh (every ``inv_update_steps`` steps);
    before a layer's first statistics its posterior is ``N(M, I/(N·hess_init +
    prior_precision))``. A curvature without an exact −½ power is refused at
    construction, with the list of those that work.

    Args:
        model: the network (``nn.Linear`` and ``nn.Conv1d``/``2d``/``3d`` layers).
        dataset_size: number of training examples.
        curvature: a registered curvature name (:func:`sampling_curvatures`).
        curvature_options: keyword arguments of its blocks (e.g. ``damping_rule``).
        fisher: ``"empirical"`` (default): statistics from the backward pass of the
            training loss (the empirical Fisher, like VOGN and SLANG); ``"sampled"``:
            from targets drawn from the model (the true Fisher, as the paper's code
            takes it), passed to :meth:`capture_fisher` inside the
            ``sampled_params(train=True)`` block (the training backward then records none).
        kl_clip: the trust region ``δ`` of the mean step (``None``: no clipping).
        lr, prior_precision, mc_samples, momentum, hess_init, kl_weight: as in
            :class:`ngrl.bayes.NoisyKFAC`.
        damping: extra damping added to the prior's, for stability.
        factor_decay, factor_update_steps, inv_update_steps: as in :class:`ngrl.optim.KFAC`.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset_size: float,
        curvature: str = "kfac",
        curvature_options: Mapping[str, Any] | None = None,
        fisher: Literal["empirical", "sampled"] = "empirical",
        kl_clip: float | None = None,
        lr: float = 1e-3,
        prior_precision: float = 1.0,
        mc_samples: int = 1,
        momentum: float = 0.9,
        damping: float = 1e-3,
        factor_decay: float = 0.99,
        factor_update_steps: int = 10,
        inv_update_steps: int = 100,
        hess_init: float = 1.0,
        kl_weight: float = 1.0,
    ) -> None:
        check_choice("fisher", fisher, FISHERS)
        options = dict(curvature_options or {})
        block_class = get_block_class(curvature)  # an unknown name lists the valid ones
        try:
            can_sample = _samples(curvature, options)
        except TypeError as error:
            raise ValueError(
                f"Invalid curvature_options for {curvature!r}: {options} ({error})"
            ) from None
        if not can_sample:
            raise ValueError(
                f"Invalid curvature: {curvature!r} with {options or 'its default options'} has "
                "no exact matrix power -1/2 to draw posterior samples; curvatures that have: "
                f"{', '.join(sampling_curvatures())}"
            )
        hyperparameters: dict[str, Any] = dict(
            momentum=momentum,
            damping=damping,
            factor_decay=factor_decay,
            factor_update_steps=factor_update_steps,
            inv_update_steps=inv_update_steps,
        )
        if kl_clip is not None:
            hyperparameters["kl_clip"] = kl_clip
        super().__init__(
            model,
            dataset_size=dataset_size,
            lr=lr,
            prior_precision=prior_precision,
            mc_samples=mc_samples,
            kl_weight=kl_weight,
            hess_init=hess_init,
            **hyperparameters,
        )
        self.curvature = curvature
        self.curvature_options = options
        self.fisher = fisher
        #: ``ν`` of the last step (1 without ``kl_clip``).
        self.trust_region_scale = 1.0
        self.blocks: dict[str, CurvatureBlock] = {
            layer.name: block_class(layer.shape, **options) for layer in self.layers
        }
        self._ready: set[str] = set()  # the blocks refreshed since their first statistics
        self.vi_state["refreshed_at"] = 0  # the step of the last refresh

    # --- statistics ---------------------------------------------------------------------
    def _capture_due(self) -> bool:
        due = self.steps % int(self.hyperparameter("factor_update_steps")) == 0
        return due and self.fisher == "empirical"

    def capture_fisher(self, loss: Tensor) -> None:
        """Take this sample's statistics from ``loss``, the loss of targets drawn from the
        model (``ngrl.fisher_loss(output)``), with a backward pass that leaves ``.grad``
        alone; call it inside ``sampled_params(train=True)``, after the forward pass and
        before the training loss's backward. For ``fisher="sampled"`` only; a step whose
        statistics are not due ignores it."""
        if self.fisher != "sampled":
            raise RuntimeError(
                f"{type(self).__name__}.capture_fisher() is for fisher='sampled'; with "
                "fisher='empirical' the training loss's backward pass gives the statistics"
            )
        if not self._in_sample:
            raise RuntimeError(
                f"{type(self).__name__}.capture_fisher() belongs inside "
                "`with optimizer.sampled_params(train=True):`"
            )
        if self.steps % int(self.hyperparameter("factor_update_steps")):
            return
        assert self._capture is not None
        with self._capture.active():
            targets = self._capture.gradient_targets() or list(self.params)
            torch.autograd.grad(loss, targets, retain_graph=True, allow_unused=True)

    def _record(self, layer: Layer, a: Tensor | None, g: Tensor) -> None:
        self.blocks[layer.name].accumulate(a, g)
        self._recorded = True

    def _reset_samples(self) -> None:
        super()._reset_samples()
        self._recorded = False

    def _statistics_finite(self) -> bool:
        return all(block.pending_is_finite() for block in self.blocks.values())

    def _discard_step(self) -> None:
        for block in self.blocks.values():
            block.discard()

    def _discard_sample(self) -> None:
        # Statistics go straight into the blocks; a failed sample spoils the whole step's.
        self._discard_step()

    # --- the posterior ------------------------------------------------------------------
    @property
    def total_damping(self) -> float:
        """``γ = prior_precision / N + damping``: the damping of every block."""
        return self.prior_damping + self.hyperparameter("damping")

    def _refreshed(self) -> dict[str, CurvatureBlock]:
        """The blocks that define their layers' posterior (refreshed after statistics)."""
        return {name: block for name, block in self.blocks.items() if name in self._ready}

    def _refresh(self) -> None:
        gamma = self.total_damping
        for name, block in self.blocks.items():
            if block.initialized:
                block.refresh(gamma)
                self._ready.add(name)
        self.vi_state["refreshed_at"] = self.steps

    def _update(self, grad: Tensor, samples: int) -> None:
        if self._recorded:
            for block in self.blocks.values():
                block.commit(self.hyperparameter("factor_decay"))
            # Due by the steps since the last refresh, so that it never depends on
            # inv_update_steps being a multiple of factor_update_steps.
            since = self.steps - int(self.vi_state["refreshed_at"])
            missing = len(self._ready) < sum(b.initialized for b in self.blocks.values())
            if missing or since >= int(self.hyperparameter("inv_update_steps")):
                self._refresh()
        momentum = self._momentum_direction(grad, self.hyperparameter("momentum"))
        gamma = self.total_damping
        refreshed = self._refreshed()
        views = self._block_views(momentum, refreshed)
        step = self._from_block_views(
            {
                name: block.multiply_matpower(views[name], gamma, -1.0).to(momentum.dtype)
                for name, block in refreshed.items()
            },
            momentum / (self.hyperparameter("hess_init") + self.prior_damping),
        )
        lr = self.hyperparameter("lr")
        kl_clip = self.param_groups[0].get("kl_clip")
        quadratic = float(torch.dot(step, momentum)) if kl_clip is not None else 0.0
        self.trust_region_scale = kl_clip_scale(quadratic, lr, kl_clip)
        self._add_to_params(step, alpha=-lr * self.trust_region_scale)

    def _noise(self) -> Tensor:
        noise = torch.randn_like(self.vi_state["momentum"]) * self._isotropic_precision() ** -0.5
        scale = self.effective_size**-0.5
        gamma = self.total_damping
        # F̂_γ^{-1/2} z with z ~ N(0, I) has covariance F̂_γ⁻¹.
        samples = {
            name: block.sample_matpower(gamma, -0.5).to(noise.dtype) * scale
            for name, block in self._refreshed().items()
        }
        return self._from_block_views(samples, noise)

    def posterior(self) -> BlockPosterior:
        """Per layer, the covariance ``F̂_γ⁻¹ / N`` of the last refresh (dense: for small
        models); the other layers keep the isotropic start."""
        gamma = self.total_damping
        layers = {}
        for name, block in self._refreshed().items():
            size = self._index[name].numel()
            basis = torch.eye(size, dtype=self.params[0].dtype, device=self.params[0].device)
            columns = [
                block.multiply_matpower(e.reshape(block.shape), gamma, -1.0).reshape(-1)
                for e in basis
            ]
            layers[name] = LayerCovariance(
                covariance=torch.stack(columns, dim=1) / self.effective_size,
                index=self._index[name].reshape(-1),
            )
        return BlockPosterior(
            mean=self.flat_mean(), isotropic=self._isotropic_precision(), layers=layers
        )

    # --- checkpoints -------------------------------------------------------------------
    def _variational_state(self) -> dict[str, Any]:
        # The statistics, and what the last refresh derived from them: it defines the
        # posterior, which must survive a round trip even between two refreshes.
        state = super()._variational_state()
        for name, block in self.blocks.items():
            for key, value in block.state_dict().items():
                state[f"{key}/{name}"] = value
        for name, block in self._refreshed().items():
            for key, values in block.derived_state().items():
                for i, value in enumerate(values):
                    state[f"{DERIVED}{key}.{i}/{name}"] = value
        state["refreshed"] = sorted(self._ready)
        return state

    def _load_variational_state(self, state: dict[str, Any]) -> None:
        per_layer: dict[str, dict[str, Any]] = {name: {} for name in self.blocks}
        for key, value in state.items():
            prefix, slash, name = key.rpartition("/")
            if slash and name in per_layer:
                per_layer[name][prefix] = value
        vi_state = {k: v for k, v in state.items() if "/" not in k and k != "refreshed"}
        super()._load_variational_state(vi_state)
        ready = set()
        for name, block in self.blocks.items():
            saved = per_layer[name]
            block.load_state_dict({key: saved[key] for key in block.state_keys if key in saved})
            derived = self._derived_from_state(saved, block)
            if derived:
                block.load_derived_state(derived, self.params[0].device)
                ready.add(name)
        if "refreshed" in state:  # blocks that derive nothing are listed, too
            ready = set(state["refreshed"]) & set(self.blocks)
        self._ready = {name for name in ready if self.blocks[name].initialized}
        if len(self._ready) < sum(block.initialized for block in self.blocks.values()):
            self._refresh()

    def _derived_from_state(
        self, saved: Mapping[str, Any], block: CurvatureBlock
    ) -> dict[str, Any]:
        """A layer's derived state among its saved entries (keyed without the layer)."""
        parts: dict[str, dict[int, Any]] = {}
        for key, value in saved.items():
            if key.startswith(DERIVED):
                derived, _, i = key[len(DERIVED) :].rpartition(".")
                parts.setdefault(derived, {})[int(i)] = value
        return {key: tuple(part[i] for i in sorted(part)) for key, part in parts.items()}
