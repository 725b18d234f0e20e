"""SLANG: a Gaussian posterior with a low-rank-plus-diagonal precision."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ngrl.bayes.base import VariationalOptimizer, blend_weight
from ngrl.bayes.posterior import LowRankPosterior
from ngrl.capture import Layer, example_gradients
from ngrl.optim.hyperparams import check_integer

__all__ = ["SLANG", "top_singular"]


def top_singular(
    matrix: Tensor, rank: int, oversampling: int, power_iterations: int
) -> tuple[Tensor, Tensor]:
    """Leading ``rank`` left singular vectors and values of ``matrix`` (``P × K``).

    Randomized (Halko, Martinsson & Tropp 2011, ``torch.svd_lowrank``) with
    ``rank + oversampling`` probe vectors and ``power_iterations`` power steps; a dense
    thin SVD when that many probes would cover ``min(P, K)`` anyway.
    """
    probes = rank + oversampling
    if probes >= min(matrix.shape):
        left, values, _ = torch.linalg.svd(matrix, full_matrices=False)
    else:
        left, values, _ = torch.svd_lowrank(matrix, q=probes, niter=power_iterations)
    return left[:, :rank], values[:rank]


def decompose(factor: Tensor, diagonal: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(d^{-1/2}, Q, S)`` with ``d^{-1/2}U = Q diag(S) Rᵀ`` (thin SVD); raises
    ``torch.linalg.LinAlgError`` when the SVD fails or its result is not finite."""
    inv_sqrt = diagonal.rsqrt()
    q, s, _ = torch.linalg.svd(inv_sqrt[:, None] * factor, full_matrices=False)
    if not (bool(torch.isfinite(q).all()) and bool(torch.isfinite(s).all())):
        raise torch.linalg.LinAlgError("the SVD of the low-rank precision is not finite")
    return inv_sqrt, q, s


class SLANG(VariationalOptimizer):
    r"""Stochastic Low-rank Approximate Natural-Gradient (Mishkin et al. 2018,
    arXiv:1811.04504): ``q = N(μ, (U Uᵀ + diag(d))⁻¹)`` with ``U`` of rank ``L``.

    With ``N = dataset_size / kl_weight``, ``λ = prior_precision``, the ``M`` per-example
    gradients ``g_i`` of this step's samples (rows of ``Ĝ``), and the bias-corrected
    weight ``w = (1 − β₂)/(1 − β₂ᵗ)``:

    .. code-block:: text

        B  = (1 − w)·U Uᵀ + w·(N/M)·ĜᵀĜ                  (never formed: B = W Wᵀ with
                                                          W = [√(1−w)·U, √(wN/M)·Ĝᵀ])
        U ← top-L eigenvectors·√eigenvalues of B           (randomized SVD of W)
        d ← (1 − w)·d + w·λ + diag(B − U Uᵀ)                (the dropped diagonal mass)
        m ← (1 − w₁)·m + w₁·(ĝ + (λ/N)μ)
        μ ← μ − lr · N·(U Uᵀ + diag(d))⁻¹ m                 (Woodbury, O(P·L²))

    The fixed point of the precision is ``λI + N·mean_i(g_i g_iᵀ)`` projected to rank
    ``L`` plus the diagonal; with ``L`` equal to the number of parameters it is exact.
    Samples are ``d^{-1/2}(I + VVᵀ)^{-1/2} z`` with ``V = d^{-1/2}U``, from a thin SVD
    of ``V``, which also serves the Woodbury solve. Per-example gradients come from
    ngrl's capture hooks.

    Args:
        model: the network (``nn.Linear`` and ``nn.Conv2d`` layers).
        dataset_size: number of training examples.
        lr: step size of the mean.
        prior_precision: precision of the Gaussian prior ``N(0, I/prior_precision)``.
        mc_samples: samples per step when :meth:`step` is given a closure.
        rank: ``L``, at most the number of parameters.
        betas: decays of the gradient momentum and of the precision average.
        hess_init: the initial precision is ``(N·hess_init + prior_precision)·I``.
        kl_weight: weight of the KL term.
        oversampling, power_iterations: of the randomized SVD.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset_size: float,
        lr: float = 1e-3,
        prior_precision: float = 1.0,
        mc_samples: int = 1,
        rank: int = 8,
        betas: tuple[float, float] = (0.9, 0.999),
        hess_init: float = 1.0,
        kl_weight: float = 1.0,
        oversampling: int = 10,
        power_iterations: int = 2,
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
            rank=rank,
        )
        if self.params[0].dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"Invalid model: SLANG needs float32 or float64 parameters (its SVDs have no "
                f"{self.params[0].dtype} kernels); convert the model with .float()"
            )
        if rank > self.numel:
            raise ValueError(
                f"Invalid rank value: {rank} (at most the number of parameters, {self.numel})"
            )
        check_integer("oversampling", oversampling, 0)
        check_integer("power_iterations", power_iterations, 0)
        self.oversampling = oversampling
        self.power_iterations = power_iterations
        mean = self.flat_mean()
        self.vi_state["factor"] = mean.new_zeros(self.numel, int(rank))
        self.vi_state["diagonal"] = torch.full_like(mean, self._isotropic_precision())
        self._decomposition: tuple[Tensor, Tensor, Tensor] | None = None

    # --- per-example gradients ----------------------------------------------------------
    def _record(self, layer: Layer, a: Tensor | None, g: Tensor) -> None:
        assert a is not None
        self._pending.append((layer.name, example_gradients(a, g)))

    def _begin_sample(self) -> None:
        self._pending: list[tuple[str, Tensor]] = []

    def _discard_sample(self) -> None:
        self._begin_sample()

    def _end_sample(self, grad: Tensor) -> None:
        # One row per example; a layer's successive backward passes add rows in order.
        rows: dict[str, list[Tensor]] = {}
        for name, grads in self._pending:
            rows.setdefault(name, []).append(grads.reshape(grads.shape[0], -1))
        if rows:
            per_layer = {name: torch.cat(parts) for name, parts in rows.items()}
            examples = {part.shape[0] for part in per_layer.values()}
            if len(examples) != 1:
                raise RuntimeError(
                    "SLANG: the layers saw different numbers of examples in one sample "
                    f"({sorted(examples)}); every layer must run once per example"
                )
            flat = grad.new_zeros(examples.pop(), self.numel)
            for name, part in per_layer.items():
                flat[:, self._index[name].reshape(-1)] = part
            self._example_grads.append(flat)
        self._begin_sample()

    def _reset_samples(self) -> None:
        super()._reset_samples()
        self._example_grads: list[Tensor] = []

    def _statistics_finite(self) -> bool:
        return all(bool(torch.isfinite(g).all()) for g in self._example_grads)

    # --- the update --------------------------------------------------------------------
    def _update(self, grad: Tensor, samples: int) -> None:
        # Everything that can fail (the two SVDs) runs before any state changes.
        factor: Tensor = self.vi_state["factor"]
        diagonal: Tensor = self.vi_state["diagonal"]
        decomposition = self._decomposition
        if self._example_grads:
            factor, diagonal = self._blended_precision(factor, diagonal)
            decomposition = None
        if decomposition is None:
            decomposition = decompose(factor, diagonal)
        momentum = self._momentum_direction(grad, self.hyperparameter("beta1"))
        self.vi_state["factor"], self.vi_state["diagonal"] = factor, diagonal
        self._decomposition = decomposition
        step = self._solve(momentum) * self.effective_size
        self._add_to_params(step, alpha=-self.hyperparameter("lr"))

    def _blended_precision(self, factor: Tensor, diagonal: Tensor) -> tuple[Tensor, Tensor]:
        """The new ``(U, d)`` from this step's per-example gradients (new tensors)."""
        weight = blend_weight(self.hyperparameter("beta2"), self.steps)
        examples = torch.cat(self._example_grads)
        scale = (weight * self.effective_size / examples.shape[0]) ** 0.5
        blend = torch.cat([factor * (1.0 - weight) ** 0.5, examples.T * scale], dim=1)
        vectors, values = top_singular(
            blend, factor.shape[1], self.oversampling, self.power_iterations
        )
        new_factor = vectors * values
        dropped = (blend.square().sum(1) - new_factor.square().sum(1)).clamp_(min=0.0)
        new_diagonal = diagonal * (1.0 - weight) + (
            dropped + self.hyperparameter("prior_precision") * weight
        )
        if not (
            bool(torch.isfinite(new_factor).all()) and bool(torch.isfinite(new_diagonal).all())
        ):
            raise torch.linalg.LinAlgError("the low-rank precision is not finite")
        return new_factor, new_diagonal

    def _decompose(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._decomposition is None:
            self._decomposition = decompose(self.vi_state["factor"], self.vi_state["diagonal"])
        return self._decomposition

    def _solve(self, vector: Tensor) -> Tensor:
        """``(U Uᵀ + diag(d))⁻¹ v`` by Woodbury: ``d^{-1/2}(I + VVᵀ)⁻¹d^{-1/2} v``."""
        inv_sqrt, q, s = self._decompose()
        x = inv_sqrt * vector
        x = x + q @ ((1.0 / (1.0 + s.square()) - 1.0) * (q.T @ x))
        return inv_sqrt * x

    def _noise(self) -> Tensor:
        inv_sqrt, q, s = self._decompose()
        z = torch.randn_like(inv_sqrt)
        z = z + q @ (((1.0 + s.square()).rsqrt() - 1.0) * (q.T @ z))
        return inv_sqrt * z

    def posterior(self) -> LowRankPosterior:
        return LowRankPosterior(
            mean=self.flat_mean(),
            factor=self.vi_state["factor"].clone(),
            diagonal=self.vi_state["diagonal"].clone(),
        )

    def _load_variational_state(self, state: dict[str, Any]) -> None:
        super()._load_variational_state(state)
        self._decomposition = None
