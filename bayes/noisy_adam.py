"""Noisy Adam (Vadam): the cheap diagonal baseline, precision from gradient magnitudes."""

from __future__ import annotations

from torch import Tensor

from ngrl.bayes.diagonal import DiagonalVariational

__all__ = ["NoisyAdam"]


class NoisyAdam(DiagonalVariational):
    r"""Vadam (Khan et al. 2018, arXiv:1806.04854): Adam whose weights are perturbed by the
    posterior noise, a mean-field Gaussian with the squared minibatch gradient as its
    curvature. No per-example gradients, so any layer type works.

    With ``N = dataset_size / kl_weight`` and ``λ̃ = prior_precision / N``, per step over
    the MC samples ``θ ~ q``:

    .. code-block:: text

        m ← (1 − w₁)·m + w₁·(ĝ + λ̃μ)                 ĝ = mean ∇ℓ̄(θ)
        s ← (1 − w₂)·s + w₂·mean_samples(∇ℓ̄(θ)²)     w_i = (1 − β_i)/(1 − β_iᵗ)
        μ ← μ − lr · m / (√s + λ̃)
        σ² = 1 / (N·s + prior_precision)

    The square root in the mean step is Adam's; the posterior uses ``s`` itself.
    Arguments: see :class:`ngrl.bayes.diagonal.DiagonalVariational`.
    """

    needs_example_statistics = False

    def _end_sample(self, grad: Tensor) -> None:
        square = grad.square()
        self._square_sum = square if self._square_sum is None else self._square_sum.add_(square)

    def _reset_samples(self) -> None:
        super()._reset_samples()
        self._square_sum: Tensor | None = None

    def _curvature_estimate(self, samples: int) -> Tensor:
        assert self._square_sum is not None
        return self._square_sum / samples

    def _mean_preconditioner(self, hessian: Tensor) -> Tensor:
        return hessian.sqrt() + self.prior_damping
