"""Small models, sampled targets and the per-layer damped solve used by the oracle tests."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngrl.fisher import empirical_fisher, flat_gradient, layer_indices
from ngrl.optim import KFAC


def sample_classes(logits: Tensor, seed: int = 1) -> Tensor:
    """Targets drawn from the model's own categorical predictive (true-Fisher samples)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=generator)[:, 0]


def ce_sum(output: Tensor, target: Tensor) -> Tensor:
    """Per-example cross-entropy, the loss whose per-example gradients the oracle takes."""
    return F.cross_entropy(output, target, reduction="sum")


def capture_batch(opt: KFAC, model: nn.Module, x: Tensor, targets: Tensor) -> None:
    """One captured backward pass of the mean cross-entropy with the given targets."""
    with opt.capture():
        F.cross_entropy(model(x), targets).backward()
    opt.zero_grad()


def fit(opt: KFAC, model: nn.Module, x: Tensor, labels: Tensor, steps: int) -> tuple[float, float]:
    """``steps`` K-FAC steps on the cross-entropy of ``labels``, statistics from targets
    sampled from the model; the loss before and after."""
    with torch.no_grad():
        start = float(F.cross_entropy(model(x), labels))
    for _ in range(steps):
        logits = model(x)
        with opt.capture():
            F.cross_entropy(logits, sample_classes(logits)).backward(retain_graph=True)
        opt.zero_grad()
        F.cross_entropy(logits, labels).backward()
        opt.step()
    with torch.no_grad():
        return start, float(F.cross_entropy(model(x), labels))


def shared_layer_factors(a: Tensor, g: Tensor, weight_sharing: str) -> tuple[Tensor, Tensor]:
    """The K-FAC-expand or K-FAC-reduce factors (Eschenhagen et al. 2023) of a dense layer
    shared by positions, from its inputs with the homogeneous coordinate ``(N, T, d_in + 1)``
    and its per-example output gradients ``(N, T, d_out)``."""
    n, positions = a.shape[0], a.shape[1]
    if weight_sharing == "expand":
        a_factor = torch.einsum("nti,ntj->ij", a, a) / n
        return a_factor, torch.einsum("nti,ntj->ij", g, g) / (n * positions)
    a_mean, g_sum = a.mean(1), g.sum(1)
    return a_mean.T @ a_mean / n, g_sum.T @ g_sum / n


def oracle_block(model: nn.Module, x: Tensor, targets: Tensor, layer: str) -> Tensor:
    """The exact Fisher block (same sampled targets) of one layer, in ngrl's order."""
    idx = layer_indices(model, layer)
    return empirical_fisher(model, ce_sum, x, targets)[idx][:, idx]


def damped_solve(block: Tensor, grad: Tensor, damping: float) -> Tensor:
    """``(F + λI)⁻¹ g``: the exact natural-gradient direction of one block."""
    eye = torch.eye(block.shape[0], dtype=block.dtype)
    return torch.linalg.solve(block + damping * eye, grad)


def layer_gradient(model: nn.Module, layer: str) -> Tensor:
    """The current gradient of one layer, in ngrl's block order."""
    return flat_gradient(model)[layer_indices(model, layer)]


def flat_parameters(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def state_tensors(entry: dict[str, Any]) -> dict[str, Tensor]:
    """One layer's optimizer-state entry as named tensors: the decompositions a state
    taken between two refreshes carries (``derived``) are spelled out, one per name."""
    flat = {}
    for key, value in entry.items():
        if key == "derived":
            for name, parts in value.items():
                flat.update({f"derived/{name}/{i}": part for i, part in enumerate(parts)})
        else:
            flat[key] = value
    return flat
