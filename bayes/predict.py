"""The Monte-Carlo predictive distribution of a model under a VI optimizer's posterior."""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor, nn

from bayes.base import VariationalOptimizer
from ngrl.optim.hyperparams import check_choice

__all__ = ["predict"]

Likelihood = Literal["classification", "regression"]


@overload
def predict(
    model: nn.Module,
    optimizer: VariationalOptimizer,
    inputs: Tensor,
    samples: int = ...,
    likelihood: Literal["classification"] = ...,
    noise_variance: float = ...,
) -> Tensor: ...


@overload
def predict(
    model: nn.Module,
    optimizer: VariationalOptimizer,
    inputs: Tensor,
    samples: int = ...,
    likelihood: Literal["regression"] = ...,
    noise_variance: float = ...,
) -> tuple[Tensor, Tensor]: ...


@torch.no_grad()
def predict(
    model: nn.Module,
    optimizer: VariationalOptimizer,
    inputs: Tensor,
    samples: int = 32,
    likelihood: Likelihood = "classification",
    noise_variance: float = 0.0,
) -> Tensor | tuple[Tensor, Tensor]:
    """The mean predictive over ``samples`` weight samples ``θ ~ q``.

    ``"classification"``: the mean of the softmax of the outputs (logits), shape
    ``(N, K)``; a single output column is a binary logit, returned as ``(N, 2)``
    probabilities ``[1 − p, p]``. ``"regression"``: ``(mean, variance)`` of the outputs
    over the samples, plus ``noise_variance`` (the likelihood's). ``samples=0`` predicts
    with the posterior mean alone.
    """
    check_choice("likelihood", likelihood, ("classification", "regression"))
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"Invalid samples value: {samples!r} (an integer >= 0)")
    if noise_variance < 0.0:
        raise ValueError(f"Invalid noise_variance value: {noise_variance} (must be >= 0)")
    outputs = []
    if samples == 0:
        outputs.append(model(inputs))
    for _ in range(samples):
        with optimizer.sampled_params(train=False):
            outputs.append(model(inputs))
    stacked = torch.stack(outputs)
    if likelihood == "regression":
        return stacked.mean(0), stacked.var(0, correction=0) + noise_variance
    if stacked.shape[-1] == 1:
        p = torch.sigmoid(stacked)
        return torch.cat([1.0 - p, p], dim=-1).mean(0)
    return torch.softmax(stacked, dim=-1).mean(0)
