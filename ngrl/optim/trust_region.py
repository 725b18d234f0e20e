"""The trust-region rule of ACKTR (Wu et al. 2017): clip the step's predicted KL."""

from __future__ import annotations

import math

__all__ = ["kl_clip_scale"]


def kl_clip_scale(quadratic: float, lr: float, kl_clip: float | None) -> float:
    """Step scale ``ν = min(1, sqrt(δ / (lr² Σ⟨X, ∇Ŵ⟩)))``.

    ``quadratic`` is ``Σ_layers ⟨X, ∇Ŵ⟩`` for preconditioned gradients ``X``; under the
    quadratic model of the KL, a step ``−lr·ν·X`` changes the policy by
    ``lr²ν²Σ⟨X, ∇Ŵ⟩ ≤ δ = kl_clip``. ``kl_clip=None`` disables the rule (ν = 1), and so
    does a non-positive model value (a zero gradient).
    """
    if kl_clip is None:
        return 1.0
    predicted = lr * lr * quadratic
    if not predicted > 0.0:
        return 1.0
    return min(1.0, math.sqrt(kl_clip / predicted))
