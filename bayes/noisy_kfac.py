"""Noisy K-FAC: a matrix-variate Gaussian posterior per layer from the K-FAC factors."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ngrl.bayes.base import VariationalOptimizer
from ngrl.bayes.posterior import KroneckerFactors, KroneckerPosterior
from ngrl.capture import Layer
from ngrl.curvature import KFACBlock
from ngrl.curvature.base import checked_state

__all__ = ["NoisyKFAC"]

# The K-FAC block's derived state: (A_γ⁻¹, G_γ⁻¹), saved as these keys per layer.
INVERSE_KEYS = ("a_inverse", "g_inverse")


class NoisyKFAC(VariationalOptimizer):
    r"""Noisy natural gradient with K-FAC (Zhang, Sun, Duvenaud & Grosse 2018,
    arXiv:1712.02390): per layer, a matrix-variate Gaussian over ``Ŵ = [W | b]``.

    With ``N = dataset_size / kl_weight`` (the paper's KL weighting), the K-FAC factors
    ``A = E[ā āᵀ]`` and ``G = E[g gᵀ]`` of ngrl's capture hooks (running averages with
    ``factor_decay``), and the prior entering as damping, ``γ = prior_precision/N +
    damping`` split between the factors by the trace rule (π-damping):

    .. code-block:: text

        A_γ = A + π√γ·I,   G_γ = G + (√γ/π)·I,   π² = (tr A / d_in) / (tr G / d_out)
        q(Ŵ) = MN(M, G_γ⁻¹/N, A_γ⁻¹):  precision N·(G_γ ⊗ A_γ)
        sample:  Ŵ = M + N^{-1/2}·G_γ^{-1/2} E A_γ^{-1/2},   E ~ N(0, I)
        m ← (1 − w)·m + w·(ĝ + (prior_precision/N)·M)     w = (1 − μ)/(1 − μᵗ)
        M ← M − lr · G_γ⁻¹ m A_γ⁻¹

    (the paper writes ``W = M + A^{-1/2} E G^{-1/2}`` for the transposed layout). The
    statistics are the per-example gradients of the training loss at the sampled weights
    (the empirical Fisher, as VOGN and SLANG use), taken every ``factor_update_steps``
    steps; the damped factors' inverses are refreshed every ``inv_update_steps`` steps.
    Each layer's :class:`ngrl.curvature.KFACBlock` (factored damping) takes the step with
    its matrix power −1 and the sample with −½. Before the first statistics the
    posterior is ``N(M, I/(N·hess_init + prior_precision))``.

    Args:
        model: the network (``nn.Linear`` and ``nn.Conv2d`` layers).
        dataset_size: number of training examples.
        lr: step size of the mean.
        prior_precision: precision of the Gaussian prior ``N(0, I/prior_precision)``.
        mc_samples: samples per step when :meth:`step` is given a closure.
        momentum: decay of the (bias-corrected) gradient momentum.
        damping: extra damping added to the prior's, for stability.
        factor_decay, factor_update_steps, inv_update_steps: as in :class:`ngrl.optim.KFAC`;
            the defaults follow the paper's code (statistics every 10 steps; its
            eigendecompositions every 200, here 100).
        hess_init: sets the posterior before the first statistics.
        kl_weight: the KL weighting (``< 1`` sharpens the posterior).
    """

    def __init__(
        self,
        model: nn.Module,
        dataset_size: float,
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
        super().__init__(
            model,
            dataset_size=dataset_size,
            lr=lr,
            prior_precision=prior_precision,
            mc_samples=mc_samples,
            kl_weight=kl_weight,
            hess_init=hess_init,
            momentum=momentum,
            damping=damping,
            factor_decay=factor_decay,
            factor_update_steps=factor_update_steps,
            inv_update_steps=inv_update_steps,
        )
        self.blocks: dict[str, KFACBlock] = {
            layer.name: KFACBlock(layer.shape, damping_rule="factored") for layer in self.layers
        }
        self.vi_state["refreshed_at"] = 0  # the step of the last refresh

    # --- statistics ---------------------------------------------------------------------
    def _capture_due(self) -> bool:
        return self.steps % int(self.hyperparameter("factor_update_steps")) == 0

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
        """``γ = prior_precision / N + damping``: the product of the two factor dampings."""
        return self.prior_damping + self.hyperparameter("damping")

    def _refreshed(self) -> dict[str, KFACBlock]:
        """The blocks whose damped factors have been inverted (by :meth:`_refresh`)."""
        return {n: b for n, b in self.blocks.items() if b.inverses is not None}

    def _refresh(self) -> None:
        gamma = self.total_damping
        for block in self.blocks.values():
            block.refresh(gamma)  # (G_γ⁻¹, A_γ⁻¹) with the π split of γ
        self.vi_state["refreshed_at"] = self.steps

    def _update(self, grad: Tensor, samples: int) -> None:
        if self._recorded:
            for block in self.blocks.values():
                block.commit(self.hyperparameter("factor_decay"))
            # Due by the steps since the last refresh, so that it never depends on
            # inv_update_steps being a multiple of factor_update_steps.
            since = self.steps - int(self.vi_state["refreshed_at"])
            missing = len(self._refreshed()) < sum(b.initialized for b in self.blocks.values())
            if missing or since >= int(self.hyperparameter("inv_update_steps")):
                self._refresh()
        momentum = self._momentum_direction(grad, self.hyperparameter("momentum"))
        step = momentum / (self.hyperparameter("hess_init") + self.prior_damping)
        gamma = self.total_damping
        for name, block in self._refreshed().items():
            index = self._index[name]
            step[index] = block.multiply_matpower(momentum[index], gamma, -1.0)
        self._add_to_params(step, alpha=-self.hyperparameter("lr"))

    def _noise(self) -> Tensor:
        noise = torch.randn_like(self.vi_state["momentum"]) * self._isotropic_precision() ** -0.5
        scale = self.effective_size**-0.5
        gamma = self.total_damping
        for name, block in self._refreshed().items():
            index = self._index[name]
            # (G_γ ⊗ A_γ)^{-1/2} z with z ~ N(0, I) has covariance G_γ⁻¹ ⊗ A_γ⁻¹.
            noise[index] = block.sample_matpower(gamma, -0.5).to(noise.dtype) * scale
        return noise

    def posterior(self) -> KroneckerPosterior:
        """Per layer, the damped factors ``G_γ``, ``A_γ`` of the last refresh."""
        layers = {}
        for name, block in self._refreshed().items():
            a_inverse, g_inverse = block.inverses  # type: ignore[misc]
            layers[name] = KroneckerFactors(
                g_factor=torch.linalg.inv(g_inverse),
                a_factor=torch.linalg.inv(a_inverse),
                scale=self.effective_size,
                index=self._index[name].reshape(-1),
            )
        return KroneckerPosterior(mean=self.flat_mean(), layers=layers)

    # --- checkpoints -------------------------------------------------------------------
    def _variational_state(self) -> dict[str, Any]:
        # The factors, and the inverses in use: they define the posterior, which must
        # survive a round trip even between two refreshes.
        state = super()._variational_state()
        for name, block in self.blocks.items():
            for key, value in block.state_dict().items():
                state[f"{key}/{name}"] = value
        for name, block in self._refreshed().items():
            for key, value in zip(INVERSE_KEYS, block.inverses or (), strict=True):
                state[f"{key}/{name}"] = value.clone()
        return state

    def _load_variational_state(self, state: dict[str, Any]) -> None:
        super()._load_variational_state({k: v for k, v in state.items() if "/" not in k})
        for name, block in self.blocks.items():
            factors = [f"{key}/{name}" for key in KFACBlock.state_keys]
            saved = all(key in state for key in factors)
            block.load_state_dict(
                {key.split("/")[0]: state[key] for key in factors} if saved else {}
            )
            inverses = [f"{key}/{name}" for key in INVERSE_KEYS]
            if saved and all(key in state for key in inverses):
                d_out, d_in = block.shape
                shapes = {"a_inverse": (d_in, d_in), "g_inverse": (d_out, d_out)}
                loaded = tuple(
                    checked_state({key: state[f"{key}/{name}"]}, key, shapes[key], "NoisyKFAC")
                    for key in INVERSE_KEYS
                )
                block.load_derived_state({"_inverses": loaded}, self.params[0].device)
        if len(self._refreshed()) < sum(block.initialized for block in self.blocks.values()):
            self._refresh()
