"""SLANG: a Gaussian posterior with a low-rank-plus-diagonal precision."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ngrl.bayes.base import VariationalOptimizer, blend_weight
from ngrl.bayes.example_gradients import LayerExampleGradients
from ngrl.bayes.posterior import LowRankPosterior
from ngrl.layers import Layer
from ngrl.linalg import all_finite

__all__ = ["SLANG"]


def decompose(factor: Tensor, diagonal: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(d^{-1/2}, Q, S)`` with ``d^{-1/2}U = Q diag(S) Rᵀ`` (thin SVD); raises
    ``torch.linalg.LinAlgError`` when it fails or its result is not finite.

    Through a QR decomposition of the tall ``d^{-1/2}U`` and the SVD of its ``L × L``
    triangle, which is less than half the time of the tall SVD and as stable.
    """
    inv_sqrt = diagonal.rsqrt()
    basis, triangle = torch.linalg.qr(inv_sqrt[:, None] * factor)
    left, s, _ = torch.linalg.svd(triangle.to(torch.float64))
    q = basis @ left.to(basis.dtype)
    s = s.to(basis.dtype)
    if not all_finite(q, s):
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
        U ← top-L eigenvectors·√eigenvalues of B           (from the Gram matrix WᵀW)
        d ← (1 − w)·d + w·λ + diag(B − U Uᵀ)                (the dropped diagonal mass)
        m ← (1 − w₁)·m + w₁·(ĝ + (λ/N)μ)
        μ ← μ − lr · N·(U Uᵀ + diag(d))⁻¹ m                 (Woodbury, O(P·L²))

    The fixed point of the precision is ``λI + N·mean_i(g_i g_iᵀ)`` projected to rank
    ``L`` plus the diagonal; with ``L`` equal to the number of parameters it is exact.
    The top eigenpairs of ``B`` are exact: with ``WᵀW = V diag(σ²) Vᵀ`` (size ``L + M``),
    the new ``U`` is ``W V_L``. Per-example gradients of dense layers stay rank-one
    factors ``g_n ā_nᵀ`` (ngrl's capture hooks), so ``WᵀW`` and ``W V_L`` cost ``O(M·L·P)``
    and no ``M × P`` matrix is formed; convolutions form theirs layer by layer. A model
    with at most ``L + M`` parameters takes the thin SVD of ``W`` itself. Samples are
    ``d^{-1/2}(I + VVᵀ)^{-1/2} z`` with ``V = d^{-1/2}U``, from a thin SVD of ``V``, which
    also serves the Woodbury solve.

    Args:
        model: the network (``nn.Linear`` and ``nn.Conv1d``/``2d``/``3d`` layers).
        dataset_size: number of training examples.
        lr: step size of the mean.
        prior_precision: precision of the Gaussian prior ``N(0, I/prior_precision)``.
        mc_samples: samples per step when :meth:`step` is given a closure.
        rank: ``L``, at most the number of parameters.
        betas: decays of the gradient momentum and of the precision average.
        hess_init: the initial precision is ``(N·hess_init + prior_precision)·I``.
        kl_weight: weight of the KL term.
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
        mean = self.flat_mean()
        self.vi_state["factor"] = mean.new_zeros(self.numel, int(rank))
        self.vi_state["diagonal"] = torch.full_like(mean, self._isotropic_precision())
        self._decomposition: tuple[Tensor, Tensor, Tensor] | None = None

    # --- per-example gradients ----------------------------------------------------------
    def _record(self, layer: Layer, a: Tensor | None, g: Tensor) -> None:
        assert a is not None
        self._pending.append((layer.name, LayerExampleGradients(a, g)))

    def _begin_sample(self) -> None:
        self._pending: list[tuple[str, LayerExampleGradients]] = []

    def _discard_sample(self) -> None:
        self._begin_sample()

    def _end_sample(self, grad: Tensor) -> None:
        # A layer's successive backward passes in one sample add examples in order.
        parts: dict[str, list[LayerExampleGradients]] = {}
        for name, found in self._pending:
            parts.setdefault(name, []).append(found)
        if parts:
            layers = {name: LayerExampleGradients.concatenate(p) for name, p in parts.items()}
            examples = {layer.examples for layer in layers.values()}
            if len(examples) != 1:
                raise RuntimeError(
                    "SLANG: the layers saw different numbers of examples in one sample "
                    f"({sorted(examples)}); every layer must run once per example"
                )
            self._example_grads.append(layers)
        self._begin_sample()

    def _reset_samples(self) -> None:
        super()._reset_samples()
        self._example_grads: list[dict[str, LayerExampleGradients]] = []

    def _statistics_finite(self) -> bool:
        return all(
            all_finite(layer.a, layer.g)
            for sample in self._example_grads
            for layer in sample.values()
        )

    # --- the update --------------------------------------------------------------------
    def _update(self, grad: Tensor, samples: int) -> None:
        # Everything that can fail (the eigendecomposition, the SVD) runs before any state
        # changes.
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
        layers = self._examples_by_layer()
        examples = next(iter(layers.values())).examples
        rank = factor.shape[1]
        keep = (1.0 - weight) ** 0.5  # W = [keep·U, scale·Ĝᵀ]
        scale = (weight * self.effective_size / examples) ** 0.5
        if self.numel <= rank + examples:
            new_factor = self._top_of_dense_blend(factor, layers, keep, scale)
        else:
            new_factor = self._top_of_gram(factor, layers, keep, scale)
        squares = self._from_block_views(
            {name: layer.squared_sum() for name, layer in layers.items()},
            torch.zeros_like(diagonal),
        )
        blended = factor.square().sum(1) * keep**2 + squares * scale**2  # diag(B)
        dropped = (blended - new_factor.square().sum(1)).clamp_(min=0.0)
        new_diagonal = diagonal * (1.0 - weight) + (
            dropped + self.hyperparameter("prior_precision") * weight
        )
        if not all_finite(new_factor, new_diagonal):
            raise torch.linalg.LinAlgError("the low-rank precision is not finite")
        return new_factor, new_diagonal

    def _examples_by_layer(self) -> dict[str, LayerExampleGradients]:
        """Each layer's per-example gradients over this step's samples, in order; a layer
        that missed a sample gets zeros for its examples."""
        counts = [next(iter(sample.values())).examples for sample in self._example_grads]
        names = {name for sample in self._example_grads for name in sample}
        layers = {}
        for name in names:
            parts = []
            for sample, count in zip(self._example_grads, counts, strict=True):
                found = sample.get(name)
                if found is None:
                    reference = next(s[name] for s in self._example_grads if name in s)
                    a, g = reference.a, reference.g
                    found = LayerExampleGradients(
                        a.new_zeros(count, *a.shape[1:]), g.new_zeros(count, *g.shape[1:])
                    )
                parts.append(found)
            layers[name] = LayerExampleGradients.concatenate(parts)
        return layers

    def _top_of_gram(
        self, factor: Tensor, layers: dict[str, LayerExampleGradients], keep: float, scale: float
    ) -> Tensor:
        """``W V_L``, the top ``L`` eigenvectors of ``B = WWᵀ`` times ``√eigenvalues``, from
        the eigendecomposition of the ``(L + M)``-square ``WᵀW``."""
        rank = factor.shape[1]
        examples = next(iter(layers.values())).examples
        blocks = self._block_views(factor, layers)  # (d_out, d_in, L)
        cross = sum(layer.inner(blocks[name]) for name, layer in layers.items())
        gram = factor.new_empty(rank + examples, rank + examples)
        gram[:rank, :rank] = factor.T @ factor * keep**2
        gram[rank:, :rank] = cross * (keep * scale)
        gram[:rank, rank:] = gram[rank:, :rank].T
        gram[rank:, rank:] = sum(layer.gram() for layer in layers.values()) * scale**2
        _, vectors = torch.linalg.eigh(gram.to(torch.float64))
        top = vectors[:, -rank:].to(factor.dtype)
        kept = factor @ top[:rank] * keep
        kept_blocks = self._block_views(kept, layers)
        return self._from_block_views(
            {
                name: kept_blocks[name] + layer.combine(top[rank:]) * scale
                for name, layer in layers.items()
            },
            kept,
        )

    def _top_of_dense_blend(
        self, factor: Tensor, layers: dict[str, LayerExampleGradients], keep: float, scale: float
    ) -> Tensor:
        """``W V_L`` from a thin SVD of ``W`` itself (a model of at most ``L + M``
        parameters)."""
        examples = next(iter(layers.values())).examples
        rows = factor.new_zeros(examples, self.numel)
        for name, layer in layers.items():
            rows[:, self._index[name].reshape(-1)] = layer.dense()
        blend = torch.cat([factor * keep, rows.T * scale], dim=1)
        left, values, _ = torch.linalg.svd(blend, full_matrices=False)
        rank = factor.shape[1]
        return left[:, :rank] * values[:rank]

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
