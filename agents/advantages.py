"""Advantage standardisation, the ``normalize_advantage`` of SB3's A2C and PPO."""

from __future__ import annotations

from torch import Tensor

__all__ = ["standardize"]


def standardize(advantages: Tensor) -> Tensor:
    """``(Â − mean Â) / (std Â + 1e-8)`` over the batch (unbiased std, as SB3)."""
    return (advantages - advantages.mean()) / (advantages.std() + 1e-8)
