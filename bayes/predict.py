"""The Monte-Carlo predictive distribution of a model under a VI optimizer's posterior."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Literal, Protocol, overload

import torch
from torch import Tensor, nn

from ngrl.optim.hyperparams import check_choice, check_integer

__all__ = ["WeightSampler", "check_owner", "mix", "predict", "sample_outputs"]

Likelihood = Literal["classification", "regression"]


class WeightSampler(Protocol):
    """What prediction needs of an optimizer: IVON's ``sampled_params`` context."""

    def sampled_params(self, train: bool = False) -> AbstractContextManager[None]: ...


@overload
def predict(
    model: nn.Module,
    optimizer: WeightSampler,
    inputs: Tensor,
    samples: int = ...,
    likelihood: Literal["classification"] = ...,
    noise_variance: float = ...,
) -> Tensor: ...


@overload
def predict(
    model: nn.Module,
    optimizer: WeightSampler,
    inputs: Tensor,
    samples: int = ...,
    likelihood: Literal["regression"] = ...,
    noise_variance: float = ...,
) -> tuple[Tensor, Tensor]: ...


@torch.no_grad()
def predict(
    model: nn.Module,
    optimizer: WeightSampler,
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
    with the posterior mean alone. Any optimizer with IVON's ``sampled_params`` serves.
    """
    check_choice("likelihood", likelihood, ("classification", "regression"))
    return mix(sample_outputs(model, optimizer, inputs, samples), likelihood, noise_variance)


@torch.no_grad()
def sample_outputs(
    model: nn.Module, optimizer: WeightSampler, inputs: Tensor, samples: int
) -> Tensor:
    """The model's outputs under ``samples`` weight samples, stacked: ``(S, N, D)``.

    ``samples=0`` gives the outputs at the posterior mean, ``(1, N, D)``.
    """
    check_integer("samples", samples, 0)
    check_owner(model, optimizer)
    if samples == 0:
        return model(inputs).unsqueeze(0)
    outputs = []
    for _ in range(samples):
        with optimizer.sampled_params(train=False):
            outputs.append(model(inputs))
    return torch.stack(outputs)


def check_owner(model: nn.Module, optimizer: WeightSampler) -> None:
    """Refuse a model whose trainable parameters are not all the optimizer's: its samples
    would go into the optimizer's own model and ``model`` would predict unsampled."""
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:  # a sampler that is not a torch optimizer: nothing to compare
        return
    owned = {id(p) for group in groups for p in group["params"]}
    foreign = [
        name for name, p in model.named_parameters() if p.requires_grad and id(p) not in owned
    ]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ValueError(
            f"Invalid model: its parameters ({shown}) are not those of the "
            f"{type(optimizer).__name__} given; pass the model the optimizer was built on"
        )


def mix(
    outputs: Tensor, likelihood: Likelihood = "classification", noise_variance: float = 0.0
) -> Tensor | tuple[Tensor, Tensor]:
    """The predictive of an equal mixture of the networks whose outputs are stacked in
    ``outputs`` (``(S, N, D)``: weight samples, ensemble members, or one network).

    The same reductions as :func:`predict`: mean class probabilities, or the mean and
    variance of the outputs plus ``noise_variance``.
    """
    check_choice("likelihood", likelihood, ("classification", "regression"))
    if noise_variance < 0.0:
        raise ValueError(f"Invalid noise_variance value: {noise_variance} (must be >= 0)")
    if likelihood == "regression":
        return outputs.mean(0), outputs.var(0, correction=0) + noise_variance
    if outputs.shape[-1] == 1:
        p = torch.sigmoid(outputs)
        return torch.cat([1.0 - p, p], dim=-1).mean(0)
    return torch.softmax(outputs, dim=-1).mean(0)
