"""TKFAC: K-FAC rescaled so that its trace equals the trace of the exact Fisher block."""

from __future__ import annotations

from torch import Tensor

from ngrl.capture import squared_gradient_norm_sum
from ngrl.curvature.base import blend, checked_state, register
from ngrl.curvature.kfac import KFACBlock

__all__ = ["TKFACBlock"]


@register("tkfac")
class TKFACBlock(KFACBlock):
    """Trace-restricted K-FAC (Gao et al. 2020, arXiv:2011.10741).

    K-FAC's factors ``A`` and ``G`` with one more statistic, the trace of the exact Fisher
    block ``τ = tr F = E_n ‖∇Ŵ ℓ_n‖²``, and a scalar that makes the approximation keep it::

        F̂ = c · G ⊗ A,   c = τ / (tr G · tr A),   so that tr F̂ = tr F.

    Everything else (eigenbasis preconditioning with exact damping, or factored damping of
    ``cG`` and ``A``) is K-FAC's. ``τ`` is averaged with the same ``factor_decay``.

    Args:
        shape: ``(d_out, d_in)`` of the combined parameter ``Ŵ = [W | b]``.
        damping_rule: ``"exact"`` (default) or ``"factored"``, as for K-FAC.
        float64_max_dim: factors up to this size are decomposed in float64.
    """

    state_keys = ("a_factor", "g_factor", "trace")

    trace: Tensor | None = None  # τ, the running trace of the exact block
    _trace_sum: Tensor | None = None

    def accumulate(self, a: Tensor | None, g: Tensor) -> None:
        super().accumulate(a, g)
        assert a is not None
        total = squared_gradient_norm_sum(a, g)
        self._trace_sum = total if self._trace_sum is None else self._trace_sum + total

    def pending_is_finite(self) -> bool:
        trace_ok = self._trace_sum is None or bool(self._trace_sum.isfinite())
        return trace_ok and super().pending_is_finite()

    def commit(self, factor_decay: float) -> None:
        if self._trace_sum is not None and self._examples:
            self.trace = blend(self.trace, self._trace_sum / self._examples, factor_decay)
        super().commit(factor_decay)

    def discard(self) -> None:
        super().discard()
        self._trace_sum = None

    def factors(self) -> tuple[Tensor, Tensor]:
        g_factor, a_factor = super().factors()
        assert self.trace is not None
        product = g_factor.trace() * a_factor.trace()
        scale = self.trace / product if float(product) > 0.0 else self.trace.new_tensor(1.0)
        return scale * g_factor, a_factor

    def state_dict(self) -> dict[str, Tensor]:
        state = super().state_dict()
        if state:
            assert self.trace is not None
            state["trace"] = self.trace.clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        trace = checked_state(state, "trace", (), type(self).__name__) if state else None
        super().load_state_dict(state)
        self.trace = trace
