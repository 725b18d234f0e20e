"""Noisy K-FAC: a matrix-variate Gaussian posterior per layer from the K-FAC factors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, cast

import torch
from torch import nn

from ngrl.bayes.noisy_natural_gradient import NoisyNaturalGradient
from ngrl.bayes.posterior import KroneckerFactors, KroneckerPosterior
from ngrl.curvature import KFACBlock
from ngrl.curvature.base import CurvatureBlock, checked_state

__all__ = ["NoisyKFAC"]

# Where checkpoints of the first noisy K-FAC kept (A_γ⁻¹, G_γ⁻¹) per layer.
INVERSE_KEYS = ("a_inverse", "g_inverse")


class NoisyKFAC(NoisyNaturalGradient):
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
    its matrix power −1 and the sample with −½: this is :class:`NoisyNaturalGradient`
    with ``curvature="kfac"`` and the factored damping rule. Before the first statistics
    the posterior is ``N(M, I/(N·hess_init + prior_precision))``.

    Args:
        model: the network (``nn.Linear`` and ``nn.Conv1d``/``2d``/``3d`` layers).
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
        fisher, kl_clip: as in :class:`NoisyNaturalGradient`.
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
        fisher: Literal["empirical", "sampled"] = "empirical",
        kl_clip: float | None = None,
    ) -> None:
        super().__init__(
            model,
            dataset_size,
            curvature="kfac",
            curvature_options={"damping_rule": "factored"},
            fisher=fisher,
            kl_clip=kl_clip,
            lr=lr,
            prior_precision=prior_precision,
            mc_samples=mc_samples,
            momentum=momentum,
            damping=damping,
            factor_decay=factor_decay,
            factor_update_steps=factor_update_steps,
            inv_update_steps=inv_update_steps,
            hess_init=hess_init,
            kl_weight=kl_weight,
        )

    def posterior(self) -> KroneckerPosterior:  # type: ignore[override]
        """Per layer, the damped factors ``G_γ``, ``A_γ`` of the last refresh."""
        layers = {}
        for name, block in self._refreshed().items():
            a_inverse, g_inverse = cast(KFACBlock, block).inverses  # type: ignore[misc]
            layers[name] = KroneckerFactors(
                g_factor=torch.linalg.inv(g_inverse),
                a_factor=torch.linalg.inv(a_inverse),
                scale=self.effective_size,
                index=self._index[name].reshape(-1),
            )
        return KroneckerPosterior(mean=self.flat_mean(), layers=layers)

    def _derived_from_state(
        self, saved: Mapping[str, Any], block: CurvatureBlock
    ) -> dict[str, Any]:
        if not all(key in saved for key in INVERSE_KEYS):
            return super()._derived_from_state(saved, block)
        d_out, d_in = block.shape
        shapes = {"a_inverse": (d_in, d_in), "g_inverse": (d_out, d_out)}
        inverses = tuple(
            checked_state({key: saved[key]}, key, shapes[key], type(self).__name__)
            for key in INVERSE_KEYS
        )
        return {"_inverses": inverses}
