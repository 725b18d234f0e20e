"""Every K-FAC hyperparameter and option in one frozen, validated value."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch

from ngrl.capture import Reduction
from ngrl.curvature.base import get_block_class
from ngrl.distributed import check_grad_worker_fraction
from ngrl.layers import WeightSharing
from ngrl.optim.hyperparams import Schedule, check, check_choice

__all__ = ["SCHEDULABLE", "KFACConfig", "RecurrentModel", "ScaleShiftBlock"]

#: The block of a normalisation layer's affine ``(γ, β)``: the exact dense Fisher block
#: or its diagonal (kfac-jax's two scale-and-shift blocks).
ScaleShiftBlock = Literal["full", "diagonal"]

#: How the time steps of a recurrent layer's maps are modelled: as independent
#: (K-FAC-expand over time, with the chosen curvature) or as a chain with a symmetric
#: lag-one transition (Martens, Ba & Johnson 2018's option 1, its own block).
RecurrentModel = Literal["independent", "chain"]

#: The hyperparameters :class:`ngrl.optim.KFAC` reads from ``param_groups[0]`` at every
#: step (so that schedulers, SB3 and a user's assignment change them); the other fields
#: fix the optimizer's structure and are read once, at construction.
SCHEDULABLE = (
    "lr",
    "damping",
    "kl_clip",
    "momentum",
    "dampening",
    "weight_decay",
    "factor_decay",
    "factor_update_steps",
    "inv_update_steps",
    "cg_steps",
)


@dataclass(frozen=True)
class KFACConfig:
    """The arguments of :class:`ngrl.optim.KFAC` (all but the model), checked once.

    Built from keyword arguments (``KFACConfig(damping=1e-3, curvature="ekfac")``), it
    raises ``ValueError`` naming the first invalid field; :meth:`replace` returns a checked
    copy with some fields changed. ``KFAC(model, **config.kwargs())`` and
    ``KFAC.from_config(model, config)`` build the same optimizer. An agent keeps one config
    and hands it to its policy's optimizer, so each value is written in one place; the
    values that may change during training live on in the optimizer's ``param_groups``
    (:data:`SCHEDULABLE`).

    Field meanings: :class:`ngrl.optim.KFAC`. Float fields (and the three step counts) may be
    callables ``f(step) -> value``.
    """

    lr: Schedule = 0.25
    damping: Schedule = 1e-2
    kl_clip: Schedule | None = 1e-3
    momentum: Schedule = 0.9
    dampening: Schedule = 0.0
    weight_decay: Schedule = 0.0
    factor_decay: Schedule = 0.95
    factor_update_steps: int | Callable[[int], int] = 1
    inv_update_steps: int | Callable[[int], int] = 10
    curvature: str = "kfac"
    cg_steps: int | Callable[[int], int] = 0
    skip_layers: tuple[str, ...] = ()
    loss_reduction: Reduction = "mean"
    stats_batch_size: int | None = None
    weight_sharing: WeightSharing = "expand"
    scale_shift: ScaleShiftBlock = "full"
    recurrent: RecurrentModel = "independent"
    curvature_options: Mapping[str, Any] = field(default_factory=dict)
    grad_worker_fraction: float = 1.0
    statistics_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        for name in SCHEDULABLE:
            value = getattr(self, name)
            if value is not None and not callable(value):
                check(name, value)
        if self.lr is None or self.damping is None:
            raise ValueError("Invalid lr or damping value: None (a number or a schedule)")
        check_choice("loss_reduction", self.loss_reduction, ("mean", "sum"))
        check_choice("weight_sharing", self.weight_sharing, ("expand", "reduce"))
        check_choice("scale_shift", self.scale_shift, ("full", "diagonal"))
        check_choice("recurrent", self.recurrent, ("independent", "chain"))
        if self.stats_batch_size is not None:
            check("stats_batch_size", self.stats_batch_size)
        check_grad_worker_fraction(self.grad_worker_fraction)
        if self.statistics_dtype is not None and not (
            isinstance(self.statistics_dtype, torch.dtype)
            and self.statistics_dtype.is_floating_point
        ):
            raise ValueError(
                f"Invalid statistics_dtype: {self.statistics_dtype!r} (a floating torch.dtype)"
            )
        get_block_class(self.curvature)  # unknown names list the valid ones
        if not isinstance(self.curvature_options, Mapping):
            raise ValueError(
                f"Invalid curvature_options: {self.curvature_options!r} (a mapping of options)"
            )
        skip = self.skip_layers
        object.__setattr__(self, "skip_layers", (skip,) if isinstance(skip, str) else tuple(skip))
        object.__setattr__(
            self, "curvature_options", MappingProxyType(dict(self.curvature_options))
        )

    def replace(self, **changes: Any) -> KFACConfig:
        """A checked copy with ``changes`` applied; unknown names are a ``ValueError``."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(
                f"Invalid K-FAC option(s): {', '.join(unknown)}; the options are "
                f"{', '.join(f.name for f in dataclasses.fields(self))}"
            )
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_options(cls, **options: Any) -> KFACConfig:
        """``KFACConfig(**options)`` with unknown names a ``ValueError`` that lists the
        valid ones (instead of a ``TypeError``)."""
        return cls().replace(**options)

    def kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments of :class:`ngrl.optim.KFAC`."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["curvature_options"] = dict(self.curvature_options)
        return values

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickles (checkpoints) hold plain values; the mapping proxy does not pickle.
        return (_rebuild, (self.kwargs(),))


def _rebuild(kwargs: dict[str, Any]) -> KFACConfig:
    return KFACConfig(**kwargs)
