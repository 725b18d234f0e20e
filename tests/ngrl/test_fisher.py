"""The oracle itself, and the sampled-target loss, checked against first principles."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributions import Categorical, Independent, Normal

from ngrl import fisher_loss
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
