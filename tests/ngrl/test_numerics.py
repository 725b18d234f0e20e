"""Hard numbers: rank-deficient and badly scaled factors, failing eigh, NaN and inf."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ngrl.curvature import available, base
from ngrl.curvature.base import symmetric_eigh
from ngrl.fisher import layer_indices
from ngrl.linalg import all_finite
from ngrl.losses import fisher_loss
from ngrl.optim import KFAC
from tests.helpers.oracle import (
    capture_batch,
    damped_solve,
    flat_parameters,
    layer_gradient,
    oracle_block,
    sample_classes,
    state_tensors,
)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("scale", [1.0, 1e6])
def test_rank_deficient_and_badly_scaled_factors_give_the_exact_step(scale: float) -> None:
    """Batch of one: A and G have rank 1. ``scale`` spreads the input over 1e-6..1e6, so
    the factor A spans a dynamic range of about 1e12 (and more, with the rank deficiency)."""
    model = nn.Linear(4, 3)
    x = torch.tensor([[1e-6, 1.0, 3.0, 1.0]]) * torch.tensor([1.0, 1.0, 1.0, scale])
    targets = sample_classes(model(x))
    opt = KFAC(model, lr=0.1, damping=1e-3, kl_clip=None, momentum=0.0)
    capture_batch(opt, model, x, targets)
    exact = oracle_block(model, x, targets, "")
    F.cross_entropy(model(x), torch.tensor([2])).backward()
    grad = layer_gradient(model, "")
    before = flat_parameters(model)[layer_indices(model, "")]
    opt.step()
    after = flat_parameters(model)[layer_indices(model, "")]
    assert torch.isfinite(after).all()
    torch.testing.assert_close(after - before, -0.1 * damped_solve(exact, grad, 1e-3))


def test_nan_gradient_skips_the_step_and_changes_nothing() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = KFAC(model, lr=0.1)
    x = torch.randn(6, 3)
    for _ in range(2):  # builds factors and a momentum buffer
        capture_batch(opt, model, x, sample_classes(model(x)))
        F.cross_entropy(model(x), torch.zeros(6, dtype=torch.long)).backward()
        opt.step()
        opt.zero_grad()
    params = flat_parameters(model)
    state = {k: v.clone() for k, v in state_tensors(opt.state_dict()["state"][0]).items()}
    steps = opt.steps
    F.cross_entropy(model(x), torch.zeros(6, dtype=torch.long)).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradients"):
        opt.step()
    assert torch.equal(flat_parameters(model), params)
    assert opt.steps == steps
    after = state_tensors(opt.state_dict()["state"][0])
    assert after.keys() == state.keys()
    for key, value in after.items():
        assert torch.equal(value, state[key])


def test_non_finite_statistics_are_dropped_and_factors_kept() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = KFAC(model)
    x = torch.randn(6, 3)
    capture_batch(opt, model, x, sample_classes(model(x)))
    a_factor = opt.blocks["0"].a_factor.clone()
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite curvature statistics"):
        with opt.capture():
            model(bad).sum().backward()
    assert torch.equal(opt.blocks["0"].a_factor, a_factor)


@pytest.mark.parametrize("form", ["categorical", "gaussian", "distribution"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_fisher_loss_of_non_finite_outputs_is_dropped_inside_capture(
    form: str, bad: float
) -> None:
    """However the Fisher loss is formed, non-finite outputs never raise from the sampler:
    the batch is dropped with the usual warning."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = KFAC(model)
    x = torch.randn(6, 3)
    capture_batch(opt, model, x, sample_classes(model(x)))
    factors = [(b.a_factor.clone(), b.g_factor.clone()) for b in opt.blocks.values()]
    with torch.no_grad():
        model[2].bias[1] = bad  # the outputs, not the inputs, are bad
    output = model(x)
    if form == "distribution":
        loss_input = torch.distributions.Categorical(logits=output, validate_args=False)
        kind = None
    else:
        loss_input, kind = output, form
    with pytest.warns(RuntimeWarning, match="non-finite curvature statistics"):
        with opt.capture():
            fisher_loss(loss_input, kind).backward()  # type: ignore[arg-type]
    for block, (a, g) in zip(opt.blocks.values(), factors, strict=True):
        assert torch.equal(block.a_factor, a) and torch.equal(block.g_factor, g)


def test_an_exception_inside_capture_leaves_no_half_batch() -> None:
    model = nn.Linear(3, 2)
    opt = KFAC(model)
    with pytest.raises(RuntimeError, match="boom"):
        with opt.capture():
            model(torch.randn(4, 3)).sum().backward()
            raise RuntimeError("boom")
    assert not opt.blocks[""].initialized
    with opt.capture():
        model(torch.randn(4, 3)).sum().backward()
    assert opt.blocks[""].initialized


def test_eigh_failure_is_retried_with_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_eigh = torch.linalg.eigh

    def flaky(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(matrix.dtype)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("failed to converge")
        return real_eigh(matrix)

    monkeypatch.setattr(base.torch.linalg, "eigh", flaky)
    factor = torch.randn(5, 3)
    factor = factor @ factor.T  # rank 3 of 5
    values, vectors = symmetric_eigh(factor)
    assert len(calls) == 2 and calls[1] == torch.float64
    assert (values >= 0).all()
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, factor, atol=1e-4, rtol=0)


def mfac_steps(model: nn.Module, opt: KFAC, x: torch.Tensor, steps: int) -> None:
    for seed in range(steps):
        out = model(x)
        capture_batch(opt, model, x, sample_classes(out, seed))
        opt.zero_grad()
        F.cross_entropy(model(x), sample_classes(out, seed + 100)).backward()
        opt.step()


@pytest.mark.parametrize("seed", range(5))
def test_mfac_on_rank_deficient_statistics_with_tiny_damping_does_not_raise(seed: int) -> None:
    """Constant inputs make the window's Gram matrix rank-deficient, and kλ = 1e-8 is below
    its rounding: the Cholesky factorisation is retried with jitter, and a step it still
    cannot take is skipped with the usual warning."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = KFAC(model, curvature="mfac", damping=1e-9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mfac_steps(model, opt, torch.ones(16, 4), 3)
    skipped = [w for w in caught if "this step was skipped" in str(w.message)]
    assert opt.steps + len(skipped) == 3 and opt.steps >= 1
    assert torch.isfinite(flat_parameters(model)).all()


def test_mfac_that_cannot_be_factored_skips_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = KFAC(model, curvature="mfac")
    x = torch.randn(16, 4)
    mfac_steps(model, opt, x, 1)
    before = flat_parameters(model)

    def failing(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return matrix, torch.tensor(1)

    monkeypatch.setattr(base.torch.linalg, "cholesky_ex", failing)
    with pytest.warns(
        RuntimeWarning, match="non-finite preconditioned gradients; this step was skipped"
    ):
        mfac_steps(model, opt, x, 1)
    assert torch.equal(flat_parameters(model), before)
    assert opt.steps == 1


def test_eigendecomposition_of_a_large_factor_stays_in_its_dtype() -> None:
    factor = torch.eye(6)
    values, vectors = symmetric_eigh(factor, float64_max_dim=4)
    assert values.dtype == vectors.dtype == torch.float32


@pytest.mark.parametrize("curvature", available())
def test_statistics_keep_their_dtype_under_bfloat16_autocast(curvature: str) -> None:
    """Statistics captured under bf16 autocast are kept (and decomposed) in float32, so a
    later float32 step works; ``statistics_dtype`` chooses another."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = KFAC(model, curvature=curvature)
    wide = KFAC(model, curvature=curvature, statistics_dtype=torch.float64)
    x = torch.randn(16, 4)
    for seed in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            assert out.dtype == torch.bfloat16
            for optimizer in (opt, wide):
                with optimizer.capture():
                    fisher_loss(out.float(), "categorical").backward(retain_graph=True)
        before = flat_parameters(model)
        opt.zero_grad()
        F.cross_entropy(model(x), sample_classes(out.float(), seed)).backward()
        opt.step()
        assert torch.isfinite(flat_parameters(model)).all()
        assert not torch.equal(flat_parameters(model), before)
    for optimizer, dtype in ((opt, torch.float32), (wide, torch.float64)):
        statistics = [
            value
            for entry in optimizer.state_dict()["state"].values()
            for key, value in state_tensors(entry).items()
            if key != "momentum_buffer" and value.is_floating_point()
        ]
        assert statistics and {t.dtype for t in statistics} == {dtype}


def test_a_bfloat16_model_steps_with_float32_statistics() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(torch.bfloat16)
    opt = KFAC(model)
    x = torch.randn(16, 4, dtype=torch.bfloat16)
    capture_batch(opt, model, x, sample_classes(model(x).float()))
    F.cross_entropy(model(x).float(), torch.zeros(16, dtype=torch.long)).backward()
    opt.step()
    assert opt.statistics_dtype == torch.float32 and opt.blocks["0"].a_factor.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match="Invalid statistics_dtype"):
        KFAC(model, statistics_dtype=torch.int32)


@pytest.mark.parametrize(
    ("values", "dtype", "finite"),
    [
        ([1.0, -2.0, 3.0], torch.float32, True),
        ([1.0, float("nan"), 3.0], torch.float32, False),
        ([1.0, float("inf"), 3.0], torch.float32, False),
        ([float("-inf"), float("inf")], torch.float32, False),  # the sum is NaN
        ([3e38, 3e38, -1.0], torch.float32, True),  # finite entries whose sum overflows
        ([6e4, 6e4], torch.float16, True),
        ([], torch.float32, True),
    ],
)
def test_all_finite_agrees_with_the_elementwise_check(
    values: list[float], dtype: torch.dtype, finite: bool
) -> None:
    tensor = torch.tensor(values, dtype=dtype)
    assert bool(torch.isfinite(tensor).all()) == finite
    assert all_finite(tensor) == finite
    assert all_finite(torch.ones(3), tensor) == finite
