"""The variational optimizers' hyperparameters: K-FAC's rules plus the posterior's own."""

from __future__ import annotations

from ngrl.optim import hyperparams

__all__ = ["RULES", "check"]

RULES: hyperparams.Rules = {
    **hyperparams.RULES,
    "dataset_size": (lambda v: v > 0, "> 0"),
    "prior_precision": (lambda v: v > 0.0, "> 0"),
    "mc_samples": (lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
    "kl_weight": (lambda v: v > 0.0, "> 0"),
    "hess_init": (lambda v: v > 0.0, "> 0"),
    "beta1": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "beta2": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "rank": (lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
}


def check(name: str, value: float) -> float:
    """Return ``value`` if it is valid for ``name``, else raise ``ValueError`` naming both."""
    return hyperparams.check(name, value, RULES)
