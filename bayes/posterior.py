"""The Gaussian posteriors the VI optimizers hold, for inspection and tests.

Every posterior is over the flat parameter vector in ``model.parameters()`` order
(trainable parameters, each flattened row-major), the order of :mod:`ngrl.fisher`.
``precision()`` and ``covariance()`` build dense ``P × P`` matrices: meant for small
models, never for training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BlockPosterior",
    "DiagonalPosterior",
    "KroneckerFactors",
    "KroneckerPosterior",
    "LayerCovariance",
    "LowRankPosterior",
    "Posterior",
]


@dataclass(frozen=True)
class Posterior:
    """``q(θ) = N(mean, precision⁻¹)``."""

    mean: Tensor

    def precision(self) -> Tensor:
        """The dense precision matrix ``Σ⁻¹``."""
        raise NotImplementedError

    def covariance(self) -> Tensor:
        """The dense covariance matrix ``Σ``."""
        return torch.linalg.inv(self.precision())


@dataclass(frozen=True)
class DiagonalPosterior(Posterior):
    """Mean-field Gaussian: ``Σ⁻¹ = diag(diagonal)`` (VOGN, noisy Adam)."""

    diagonal: Tensor

    def precision(self) -> Tensor:
        return torch.diag(self.diagonal)

    def covariance(self) -> Tensor:
        return torch.diag(self.diagonal.reciprocal())


@dataclass(frozen=True)
class LowRankPosterior(Posterior):
    """Low-rank plus diagonal precision ``Σ⁻¹ = U Uᵀ + diag(diagonal)`` (SLANG)."""

    factor: Tensor
    diagonal: Tensor

    def precision(self) -> Tensor:
        return self.factor @ self.factor.T + torch.diag(self.diagonal)


@dataclass(frozen=True)
class KroneckerFactors:
    """One layer of a matrix-variate Gaussian: precision ``scale·(G ⊗ A)`` over the
    layer's ``Ŵ = [W | b]`` in row-major order; ``index`` maps that order to flat
    positions. ``g_factor`` and ``a_factor`` already include their damping."""

    g_factor: Tensor
    a_factor: Tensor
    scale: float
    index: Tensor

    def precision(self) -> Tensor:
        return self.scale * torch.kron(self.g_factor, self.a_factor)

    def covariance(self) -> Tensor:
        return (
            torch.kron(torch.linalg.inv(self.g_factor), torch.linalg.inv(self.a_factor))
            / self.scale
        )


@dataclass(frozen=True)
class KroneckerPosterior(Posterior):
    """Block-diagonal over layers, each block a Kronecker product (noisy K-FAC)."""

    layers: dict[str, KroneckerFactors]

    def precision(self) -> Tensor:
        return self._block_diagonal(KroneckerFactors.precision)

    def covariance(self) -> Tensor:
        return self._block_diagonal(KroneckerFactors.covariance)

    def _block_diagonal(self, block: Callable[[KroneckerFactors], Tensor]) -> Tensor:
        size = self.mean.numel()
        dense = torch.zeros(size, size, dtype=self.mean.dtype, device=self.mean.device)
        for factors in self.layers.values():
            idx = factors.index
            dense[idx[:, None], idx[None, :]] = block(factors)
        return dense


@dataclass(frozen=True)
class LayerCovariance:
    """One layer's dense covariance over its ``Ŵ = [W | b]`` in row-major order; ``index``
    maps that order to flat positions."""

    covariance: Tensor
    index: Tensor


@dataclass(frozen=True)
class BlockPosterior(Posterior):
    """Block-diagonal over layers, each block dense (noisy natural gradient with any
    curvature); parameters outside the blocks have the precision ``isotropic``."""

    isotropic: float
    layers: dict[str, LayerCovariance]

    def precision(self) -> Tensor:
        return self._blocks(self.isotropic, torch.linalg.inv)

    def covariance(self) -> Tensor:
        return self._blocks(1.0 / self.isotropic, lambda covariance: covariance)

    def _blocks(self, diagonal: float, block: Callable[[Tensor], Tensor]) -> Tensor:
        size = self.mean.numel()
        dense = diagonal * torch.eye(size, dtype=self.mean.dtype, device=self.mean.device)
        for layer in self.layers.values():
            idx = layer.index
            dense[idx[:, None], idx[None, :]] = block(layer.covariance)
        return dense
