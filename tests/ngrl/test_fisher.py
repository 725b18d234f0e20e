"""The oracle itself, and the sampled-target loss, checked against first principles."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributions import Categorical, Independent, Normal

from ngrl import fisher_divergence, fisher_loss
from ngrl.fisher import empirical_fisher, exact_fisher, per_example_gradients
from tests.helpers.oracle import ce_sum

pytestmark = pytest.mark.usefixtures("float64")


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))


def test_per_example_gradients_match_a_loop_of_backward_passes() -> None:
    model = small_model()
    x, y = torch.randn(5, 3), torch.randint(0, 3, (5,))
    rows = []
    for n in range(5):
        model.zero_grad()
        ce_sum(model(x[n : n + 1]), y[n : n + 1]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(per_example_gradients(model, ce_sum, x, y), torch.stack(rows))


def test_exact_categorical_fisher_is_the_limit_of_sampled_empirical_fishers() -> None:
    model = small_model()
    x = torch.randn(2, 3).repeat(5000, 1)
    with torch.no_grad():
        targets = Categorical(logits=model(x)).sample()
    sampled = empirical_fisher(model, ce_sum, x, targets)
    exact = exact_fisher(model, x[:2], "categorical")
    assert (sampled - exact).norm() / exact.norm() < 0.05


def test_exact_gaussian_fisher_is_the_gauss_newton_matrix() -> None:
    model = small_model()
    x = torch.randn(4, 3)
    jac = torch.stack(
        [
            torch.cat(
                [
                    j.flatten(1)
                    for j in torch.autograd.functional.jacobian(
                        lambda *p: torch.func.functional_call(
                            model,
                            dict(zip([n for n, _ in model.named_parameters()], p, strict=True)),
                            (x[n : n + 1],),
                        )[0],
                        tuple(model.parameters()),
                    )
                ],
                dim=1,
            )
            for n in range(4)
        ]
    )
    expected = torch.einsum("nkp,nkq->pq", jac, jac) / 4
    torch.testing.assert_close(exact_fisher(model, x, "gaussian"), expected)


@pytest.mark.parametrize("form", ["distribution", "logits"])
def test_categorical_fisher_loss_gradients_have_the_fisher_as_second_moment(form: str) -> None:
    logits = torch.tensor([[0.5, -1.0, 2.0]]).repeat(20000, 1).requires_grad_()
    if form == "distribution":
        loss = fisher_loss(Categorical(logits=logits), reduction="sum")
    else:
        loss = fisher_loss(logits, kind="categorical", reduction="sum")
    (grads,) = torch.autograd.grad(loss, logits)
    p = torch.softmax(logits[0].detach(), -1)
    expected = torch.diag(p) - torch.outer(p, p)
    torch.testing.assert_close(grads.T @ grads / grads.shape[0], expected, atol=0.01, rtol=0)


def test_gaussian_fisher_loss_has_unit_fisher_and_mean_reduction() -> None:
    mean = torch.zeros(20000, 2, requires_grad=True)
    (grads,) = torch.autograd.grad(fisher_loss(mean, kind="gaussian"), mean)
    per_example = grads * mean.shape[0]
    torch.testing.assert_close(per_example.T @ per_example / 20000, torch.eye(2), atol=0.03, rtol=0)
    std = torch.ones(3, 2)
    loss = fisher_loss(Independent(Normal(mean[:3], std), 1))
    assert loss.shape == ()


def test_fisher_loss_rejects_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="kind"):
        fisher_loss(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="Distribution or a Tensor"):
        fisher_loss([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduction"):
        fisher_loss(torch.zeros(2, 3), kind="gaussian", reduction="max")  # type: ignore[arg-type]


def divergence_hessian(model: nn.Module, divergence: object) -> torch.Tensor:
    """The Hessian of ``divergence(model)`` in the model's flat parameters (torch.func)."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [p.numel() for p in params.values()]

    def of_flat(flat: torch.Tensor) -> torch.Tensor:
        pieces = dict(zip(names, flat.split(sizes), strict=True))
        shaped = {n: pieces[n].view_as(p) for n, p in params.items()}
        return divergence(lambda x: torch.func.functional_call(model, shaped, (x,)))  # type: ignore[operator]

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    return torch.autograd.functional.hessian(of_flat, flat)


@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_fisher_divergence_has_the_exact_fisher_as_hessian(kind: str) -> None:
    model, x = small_model(), torch.randn(7, 3)
    hessian = divergence_hessian(model, lambda f: fisher_divergence(f(x), kind=kind))  # type: ignore[arg-type]
    torch.testing.assert_close(hessian, exact_fisher(model, x, kind), rtol=1e-9, atol=1e-12)  # type: ignore[arg-type]
    # A distribution gives the same divergence, and "sum" is N times "mean".
    out = model(x)
    if kind == "categorical":
        as_distribution = fisher_divergence(Categorical(logits=out))
        torch.testing.assert_close(as_distribution, fisher_divergence(out, kind=kind))
    summed = fisher_divergence(out, kind=kind, reduction="sum")  # type: ignore[arg-type]
    torch.testing.assert_close(summed, 7 * fisher_divergence(out, kind=kind))  # type: ignore[arg-type]


def test_fisher_divergence_of_a_gaussian_policy_is_its_fisher() -> None:
    """A Gaussian with a state-dependent mean and a free log-std: its Fisher is
    ``E[Jᵀ diag(σ⁻²) J]`` for the mean and ``2`` per log-std (and nothing between)."""
    torch.manual_seed(0)

    class Policy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mean = nn.Linear(3, 2)
            self.log_std = nn.Parameter(torch.tensor([-0.5, 0.3]))

        def forward(self, x: torch.Tensor) -> Independent:
            return Independent(Normal(self.mean(x), self.log_std.exp().expand(len(x), 2)), 1)

    policy, x = Policy(), torch.randn(9, 3)
    hessian = divergence_hessian(policy, lambda f: fisher_divergence(f(x)))
    precision = (-2 * policy.log_std.detach()).exp()  # σ⁻²
    # The flat order: log_std (the module's own parameter first), then the weight's rows
    # and the bias.
    inputs = torch.cat([x, torch.ones(9, 1)], 1)
    mean_block = torch.zeros(8, 8)
    for out in range(2):
        rows = [out * 3 + i for i in range(3)] + [6 + out]
        mean_block[torch.tensor(rows)[:, None], torch.tensor(rows)] = (
            precision[out] * inputs.T @ inputs / 9
        )
    expected = torch.block_diag(2 * torch.eye(2), mean_block)
    torch.testing.assert_close(hessian, expected, rtol=1e-9, atol=1e-12)


def test_fisher_divergence_rejects_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="kind"):
        fisher_divergence(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="no detached copy of a Gamma"):
        fisher_divergence(torch.distributions.Gamma(torch.ones(2), torch.ones(2)))
    with pytest.raises(ValueError, match="reduction"):
        fisher_divergence(torch.zeros(2, 3), kind="gaussian", reduction="max")  # type: ignore[arg-type]
