"""Hyperparameters that may be constants or schedules, validated the way torch.optim does."""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["RULES", "Rules", "Schedule", "check", "check_choice", "check_integer", "resolve"]

#: A hyperparameter: a constant, or a function of the optimizer's step count.
Schedule = float | Callable[[int], float]

#: name -> (predicate, human description of the valid range).
Rules = dict[str, tuple[Callable[[float], bool], str]]

#: The K-FAC optimizer's hyperparameters (each package that adds names has its own table).
RULES: Rules = {
    "lr": (lambda v: v >= 0.0, ">= 0"),
    "damping": (lambda v: v > 0.0, "> 0"),
    "kl_clip": (lambda v: v > 0.0, "> 0 (or None to disable the trust region)"),
    "momentum": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "dampening": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "weight_decay": (lambda v: v >= 0.0, ">= 0"),
    "factor_decay": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "factor_update_steps": (lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
    "inv_update_steps": (lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
    "cg_steps": (lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0"),
    "stats_batch_size": (lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
}


def check(name: str, value: float, rules: Rules = RULES) -> float:
    """Return ``value`` if it is valid for ``name`` (by ``rules``), else raise
    ``ValueError`` naming both."""
    predicate, description = rules[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name} value: {value!r} (expected a number {description})")
    if not math.isfinite(value) or not predicate(value):
        raise ValueError(f"Invalid {name} value: {value} (must be {description})")
    return value


def check_integer(name: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an integer (not a bool) ``>= minimum``, else raise
    ``ValueError`` naming both."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name} value: {value!r} (an integer >= {minimum})")
    return value


def check_choice(name: str, value: object, choices: tuple[object, ...]) -> object:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError`` listing them."""
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Invalid {name} value: {value!r} (use one of {listed})")
    return value


def resolve(name: str, value: Schedule | None, step: int) -> float | None:
    """The value of a hyperparameter at ``step``: schedules are called, then checked."""
    if value is None:
        return None
    if callable(value):
        return check(name, value(step))
    return check(name, value)
