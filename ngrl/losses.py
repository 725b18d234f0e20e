"""The Fisher of a model's predictive distribution, as losses: a sampled-target loss whose
backward pass gives its statistics, and a divergence whose Hessian is the Fisher itself."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Bernoulli, Categorical, Distribution, Independent, Normal

__all__ = ["fisher_divergence", "fisher_loss"]


def fisher_loss(
    output: Distribution | Tensor,
    kind: Literal["categorical", "gaussian"] | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``−log p(ŷ | x)`` with ``ŷ`` drawn from the model's own predictive distribution.

    Since ``E_ŷ[∇log p(ŷ) ∇log p(ŷ)ᵀ]`` is the Fisher, the backward pass of this loss
    inside ``with optimizer.capture():`` gives K-FAC the statistics of the *true* Fisher,
    not the empirical one (the ACKTR recipe, Wu et al. 2017).

    Args:
        output: a ``torch.distributions.Distribution`` whose parameters depend on the
            model (a policy's action distribution), or a tensor of model outputs read
            according to ``kind``.
        kind: for a tensor ``output``: ``"categorical"`` (logits over the last dimension)
            or ``"gaussian"`` (mean of a unit-variance Gaussian: ACKTR's value head).
        reduction: ``"mean"`` or ``"sum"`` over the batch (the first dimension); the
            optimizer's ``loss_reduction`` must agree.
        generator: random generator for the sampled targets (tensor outputs only).
    """
    _check_reduction(reduction)
    if isinstance(output, Distribution):
        try:
            with torch.no_grad():
                target = output.sample()
        except (RuntimeError, ValueError):  # non-finite parameters cannot be sampled
            per_example = _not_finite(output)
        else:
            per_example = -output.log_prob(target)
            per_example = per_example.reshape(per_example.shape[0], -1).sum(1)
    elif isinstance(output, Tensor):
        if kind == "categorical":
            with torch.no_grad():
                probs = torch.softmax(output.reshape(-1, output.shape[-1]), dim=-1)
                # A row that is not finite gets any target: its loss is NaN all the same.
                probs = torch.where(probs.isfinite().all(-1, keepdim=True), probs, 1.0)
                target = torch.multinomial(probs, 1, generator=generator).reshape(output.shape[:-1])
            per_example = (
                F.cross_entropy(
                    output.reshape(-1, output.shape[-1]), target.reshape(-1), reduction="none"
                )
                .reshape(output.shape[0], -1)
                .sum(1)
            )
        elif kind == "gaussian":
            noise = torch.randn(
                output.shape, dtype=output.dtype, device=output.device, generator=generator
            )
            target = output.detach() + noise
            per_example = 0.5 * (output - target).square().reshape(output.shape[0], -1).sum(1)
        else:
            raise ValueError(
                f"Invalid kind: {kind!r}; a tensor output needs kind='categorical' "
                "(logits) or kind='gaussian' (unit-variance mean)"
            )
    else:
        raise TypeError(
            f"fisher_loss takes a torch Distribution or a Tensor, got {type(output).__name__}"
        )
    return per_example.mean() if reduction == "mean" else per_example.sum()


def fisher_divergence(
    output: Distribution | Tensor,
    kind: Literal["categorical", "gaussian"] | None = None,
    reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """``KL(p_old ‖ p_θ)`` of the model's predictive distribution from a detached copy of it.

    Its gradient is zero and its Hessian is the Fisher that :func:`fisher_loss` estimates
    by sampling (Schulman et al. 2015, TRPO, appendix C), so its Hessian-vector products
    are exact Fisher-vector products: ``KFAC(..., cg_steps=k)`` takes it as
    ``step(divergence=...)``. ``output``, ``kind`` and ``reduction`` as in
    :func:`fisher_loss`; distributions: ``Categorical``, ``Normal``, ``Bernoulli`` and
    ``Independent`` ones of these.
    """
    _check_reduction(reduction)
    if isinstance(output, Distribution):
        kl = torch.distributions.kl_divergence(_detached(output), output)
        per_example = kl.reshape(kl.shape[0], -1).sum(1)
    elif isinstance(output, Tensor):
        old = output.detach()
        if kind == "categorical":
            kl = old.softmax(-1) * (old.log_softmax(-1) - output.log_softmax(-1))
        elif kind == "gaussian":
            kl = 0.5 * (output - old).square()
        else:
            raise ValueError(
                f"Invalid kind: {kind!r}; a tensor output needs kind='categorical' "
                "(logits) or kind='gaussian' (unit-variance mean)"
            )
        per_example = kl.reshape(output.shape[0], -1).sum(1)
    else:
        raise TypeError(
            f"fisher_divergence takes a torch Distribution or a Tensor, got {type(output).__name__}"
        )
    return per_example.mean() if reduction == "mean" else per_example.sum()


def _detached(output: Distribution) -> Distribution:
    """The same distribution with its parameters cut from the graph."""
    if isinstance(output, Categorical):
        return Categorical(logits=output.logits.detach())
    if isinstance(output, Bernoulli):
        return Bernoulli(logits=output.logits.detach())
    if isinstance(output, Normal):
        return Normal(output.loc.detach(), output.scale.detach())
    if isinstance(output, Independent):
        return Independent(_detached(output.base_dist), output.reinterpreted_batch_ndims)
    raise TypeError(
        f"fisher_divergence: no detached copy of a {type(output).__name__}; it takes "
        "Categorical, Normal, Bernoulli and Independent distributions"
    )


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"Invalid reduction: {reduction!r} (use 'mean' or 'sum')")


def _not_finite(output: Distribution) -> Tensor:
    """A NaN per-example loss whose backward pass reaches the distribution's parameters,
    so that ``capture()`` sees non-finite statistics and drops the batch (with a warning)
    instead of the sampler raising."""
    tensors = [v for v in vars(output).values() if isinstance(v, Tensor) and v.requires_grad]
    if not tensors:
        raise ValueError("fisher_loss: the distribution's parameters are not finite")
    batch = tensors[0].shape[0]
    return sum(  # type: ignore[return-value]
        (t * float("nan")).reshape(batch, -1).sum(1) for t in tensors
    )
