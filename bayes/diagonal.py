"""The mean-field Gaussian shared by VOGN and noisy Adam: state, sampling, update skeleton."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from ngrl.bayes.base import VariationalOptimizer, blend_weight
from ngrl.bayes.posterior import DiagonalPosterior

__all__ = ["DiagonalVariational"]


class DiagonalVariational(VariationalOptimizer):
    r"""``q = N(μ, diag(1/(N·s + prior_precision)))`` with a curvature estimate ``s`` of the
    mean loss. Per step, with bias-corrected averages (weights ``w_i = (1−β_i)/(1−β_iᵗ)``):

    .. code-block:: text

        m ← (1 − w₁)·m + w₁·(ĝ + λ̃μ)
        s ← (1 − w₂)·s + w₂·ĥ             ĥ: the subclass's curvature estimate
        μ ← μ − lr · m / P(s)              P: the subclass's mean preconditioner

    Args:
        model: the network.
        dataset_size: number of training examples ``N``.
        lr: step size of the mean.
        prior_precision: precision of the Gaussian prior ``N(0, I/prior_precision)``.
        mc_samples: samples per step when :meth:`step` is given a closure.
        betas: decays of the gradient momentum and of the curvature average.
        hess_init: ``s`` before the first step (the initial posterior precision is
            ``N·hess_init + prior_precision``).
        kl_weight: weight of the KL term (``< 1`` sharpens the posterior).
    """

    def __init__(
        self,
        model: nn.Module,
        dataset_size: float,
        lr: float = 1e-3,
        prior_precision: float = 1.0,
        mc_samples: int = 1,
        betas: tuple[float, float] = (0.9, 0.999),
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
            beta1=betas[0],
            beta2=betas[1],
        )
        self.vi_state["hessian"] = torch.full_like(self.flat_mean(), float(hess_init))

    @abstractmethod
    def _curvature_estimate(self, samples: int) -> Tensor:
        """``ĥ``: this step's curvature estimate of the mean loss (flat)."""

    @abstractmethod
    def _mean_preconditioner(self, hessian: Tensor) -> Tensor:
        """``P(s)``: the divisor of the mean step."""

    def _update(self, grad: Tensor, samples: int) -> None:
        momentum = self._momentum_direction(grad, self.hyperparameter("beta1"))
        hessian: Tensor = self.vi_state["hessian"]
        weight = blend_weight(self.hyperparameter("beta2"), self.steps)
        hessian.mul_(1.0 - weight).add_(self._curvature_estimate(samples), alpha=weight)
        step = momentum / self._mean_preconditioner(hessian)
        self._add_to_params(step, alpha=-self.hyperparameter("lr"))

    def _load_variational_state(self, state: dict[str, Any]) -> None:
        super()._load_variational_state(state)
        self._sigma_key = None  # the loaded s is another tensor

    def _precision(self) -> Tensor:
        hessian: Tensor = self.vi_state["hessian"]
        return hessian * self.effective_size + self.hyperparameter("prior_precision")

    def _noise(self) -> Tensor:
        noise = torch.randn_like(self.vi_state["hessian"])
        return noise.mul_(self._standard_deviation())

    def _standard_deviation(self) -> Tensor:
        """``σ = (N·s + prior_precision)^{-½}``, recomputed only when ``s``, ``N`` or the
        prior changed (every step draws from it, once per MC sample)."""
        hessian: Tensor = self.vi_state["hessian"]
        key = (
            id(hessian),
            hessian._version,
            self.effective_size,
            self.hyperparameter("prior_precision"),
        )
        if getattr(self, "_sigma_key", None) != key:
            self._sigma = self._precision().rsqrt_()
            self._sigma_key = key
        return self._sigma

    def posterior(self) -> DiagonalPosterior:
        return DiagonalPosterior(mean=self.flat_mean(), diagonal=self._precision())
