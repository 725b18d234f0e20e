"""The VI optimizers' shared contract: sampling blocks, checkpoints, bad input, predict."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngrl.bayes import SLANG, VOGN, NoisyAdam, NoisyKFAC, NoisyNaturalGradient, predict
from ngrl.bayes.base import VariationalOptimizer

OPTIMIZERS: dict[str, Callable[..., VariationalOptimizer]] = {
    "vogn": VOGN,
    "noisy-adam": NoisyAdam,
    "slang": lambda model, n, **kw: SLANG(model, n, rank=3, **kw),
    "noisy-kfac": NoisyKFAC,
    # Blocks with derived state (eigenbases) and without (a window of gradients).
    "noisy-ekfac": lambda model, n, **kw: NoisyNaturalGradient(model, n, curvature="ekfac", **kw),
    "noisy-mfac": lambda model, n, **kw: NoisyNaturalGradient(model, n, curvature="mfac", **kw),
}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def batch() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def train(opt: VariationalOptimizer, model: nn.Module, steps: int) -> None:
    x, y = batch()
    for _ in range(steps):
        with opt.sampled_params(train=True):
            F.cross_entropy(model(x), y).backward()
        opt.step()


def snapshot(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_identical(model: nn.Module, params: list[Tensor]) -> None:
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("train_mode", [False, True], ids=["predict", "train"])
def test_sampled_params_restores_the_mean_exactly(name: str, train_mode: bool) -> None:
    model = mlp()
    opt = OPTIMIZERS[name](model, 100, lr=0.05, hess_init=1e-3)  # wide: samples move far
    train(opt, model, 3)
    mean = snapshot(model)
    x, y = batch()
    with opt.sampled_params(train=train_mode):
        inside = snapshot(model)
        if train_mode:
            F.cross_entropy(model(x), y).backward()
    assert any(not torch.equal(a, b) for a, b in zip(inside, mean, strict=True))
    assert_identical(model, mean)

    with pytest.raises(ZeroDivisionError), opt.sampled_params(train=train_mode):
        F.cross_entropy(model(x), y).backward()
        raise ZeroDivisionError
    assert_identical(model, mean)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip_continues_identically(name: str) -> None:
    model = mlp()
    opt = OPTIMIZERS[name](model, 100, lr=0.05)
    train(opt, model, 4)
    twin = copy.deepcopy(model)
    twin_opt = OPTIMIZERS[name](twin, 100, lr=0.05)
    twin_opt.load_state_dict(opt.state_dict())
    torch.manual_seed(7)
    train(opt, model, 2)
    torch.manual_seed(7)
    train(twin_opt, twin, 2)
    assert_identical(twin, snapshot(model))
    assert twin_opt.steps == opt.steps == 6
    torch.testing.assert_close(twin_opt.posterior().precision(), opt.posterior().precision())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_state_dict_of_another_shape_or_kind_is_refused(name: str) -> None:
    opt = OPTIMIZERS[name](mlp(), 100)
    other = OPTIMIZERS[name](nn.Sequential(nn.Linear(4, 2)), 100)
    with pytest.raises(ValueError, match="Invalid state_dict"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="Invalid state_dict"):
        opt.load_state_dict(torch.optim.SGD(mlp().parameters(), lr=0.1).state_dict())
    kinds = [k for k in OPTIMIZERS if k != name]
    stranger = OPTIMIZERS[kinds[0]](mlp(), 100)
    with pytest.raises(ValueError, match="Invalid state_dict: from"):
        opt.load_state_dict(stranger.state_dict())


def test_a_refused_state_dict_leaves_the_optimizer_as_it_was() -> None:
    model = mlp()
    opt = NoisyKFAC(model, 100, lr=0.05)
    train(opt, model, 3)
    before = copy.deepcopy(opt.state_dict())
    broken = copy.deepcopy(before)
    broken["variational"]["a_factor/2"] = torch.eye(2)  # the second layer's, wrong shape
    broken["variational"]["step"] = 99
    with pytest.raises(ValueError, match="does not fit"):
        opt.load_state_dict(broken)
    after = opt.state_dict()
    assert after["variational"]["step"] == 3
    for key, value in before["variational"].items():
        kept = after["variational"][key]
        assert torch.equal(kept, value) if isinstance(value, Tensor) else kept == value


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_without_a_training_sample_is_an_error(name: str) -> None:
    model = mlp()
    opt = OPTIMIZERS[name](model, 100)
    with pytest.raises(RuntimeError, match="sampled_params"):
        opt.step()
    with pytest.raises(RuntimeError, match="backward"), opt.sampled_params(train=True):
        pass


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_non_finite_gradient_skips_the_step_and_changes_nothing(name: str) -> None:
    model = mlp()
    opt = OPTIMIZERS[name](model, 100, lr=0.05)
    train(opt, model, 2)
    mean, state = snapshot(model), copy.deepcopy(opt.state_dict())
    x, y = batch()
    with opt.sampled_params(train=True):
        (F.cross_entropy(model(x), y) * float("nan")).backward()
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert_identical(model, mean)
    after = opt.state_dict()["variational"]
    for key, value in state["variational"].items():
        assert torch.equal(after[key], value) if isinstance(value, Tensor) else after[key] == value
    train(opt, model, 1)  # and training goes on
    assert opt.steps == 3


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset_size": 0}, "dataset_size"),
        ({"dataset_size": -5}, "dataset_size"),
        ({"prior_precision": -1.0}, "prior_precision"),
        ({"mc_samples": 0}, "mc_samples"),
        ({"lr": -0.1}, "lr"),
    ],
)
def test_bad_hyperparameters_name_the_argument(name: str, kwargs: dict, message: str) -> None:
    arguments = {"dataset_size": 100, **kwargs}
    with pytest.raises(ValueError, match=f"Invalid {message} value"):
        OPTIMIZERS[name](mlp(), arguments.pop("dataset_size"), **arguments)


def test_slang_rank_above_the_number_of_parameters_is_refused() -> None:
    model = nn.Linear(2, 1)  # 3 parameters
    with pytest.raises(ValueError, match="Invalid rank value: 4 .*3"):
        SLANG(model, 100, rank=4)
    SLANG(model, 100, rank=3)


@pytest.mark.parametrize("cls", [VOGN, SLANG, NoisyKFAC])
def test_layers_without_per_example_gradients_are_refused(cls: type) -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"nn.Linear and nn.Conv1d/2d/3d .*1 \(BatchNorm1d\)"):
        cls(model, 100, rank=2) if cls is SLANG else cls(model, 100)


def test_noisy_adam_takes_any_layer() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    opt = NoisyAdam(model, 100, lr=0.05)
    train(opt, model, 2)
    assert opt.steps == 2


def test_predict_averages_probabilities_and_regression_moments() -> None:
    model = mlp()
    opt = VOGN(model, 100, hess_init=1e-2)
    x, _ = batch()
    probs = predict(model, opt, x, samples=5)
    assert probs.shape == (16, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(16))
    with torch.no_grad():
        torch.testing.assert_close(predict(model, opt, x, samples=0), torch.softmax(model(x), -1))

    regressor = nn.Linear(4, 1)
    opt = VOGN(regressor, 100, hess_init=1e-2)
    torch.manual_seed(3)
    mean, variance = predict(
        regressor, opt, x, samples=4000, likelihood="regression", noise_variance=0.5
    )
    # Linear model: the predictive variance is āᵀΣā + noise, exactly, in expectation.
    a_bar = torch.cat([x, torch.ones(16, 1)], dim=1)
    covariance = opt.posterior().covariance()
    expected = (a_bar @ covariance * a_bar).sum(1, keepdim=True) + 0.5
    torch.testing.assert_close(variance, expected, rtol=0.1, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(mean, regressor(x), atol=0.05, rtol=0)
    binary = predict(regressor, opt, x, samples=3)
    assert binary.shape == (16, 2)

    with pytest.raises(ValueError, match="Invalid likelihood value: 'poisson'"):
        predict(model, opt, x, likelihood="poisson")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="Invalid samples value"):
        predict(model, opt, x, samples=-1)


@pytest.mark.parametrize(("factor_steps", "inv_steps"), [(10, 100), (3, 5)])
def test_noisy_kfac_posterior_follows_the_factors_at_each_refresh(
    factor_steps: int, inv_steps: int
) -> None:
    model = mlp()
    opt = NoisyKFAC(
        model, 100, lr=0.05, factor_update_steps=factor_steps, inv_update_steps=inv_steps
    )
    refreshes = []
    for _ in range(3 * inv_steps + 1):
        train(opt, model, 1)
        if opt.vi_state["refreshed_at"] == opt.steps:
            refreshes.append(opt.steps)
            layer = opt.posterior().layers["0"]
            block = opt.blocks["0"]
            a_damping, _ = block.factored_damping(opt.total_damping)
            expected = block.a_factor + a_damping * torch.eye(block.a_factor.shape[0])
            torch.testing.assert_close(layer.a_factor, expected, rtol=1e-4, atol=1e-6)
    # The first statistics, then every inv_steps steps at the next statistics.
    assert len(refreshes) >= 3, refreshes
    gaps = [b - a for a, b in zip(refreshes, refreshes[1:], strict=False)]
    assert all(inv_steps <= gap < inv_steps + factor_steps for gap in gaps), refreshes


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_predict_refuses_a_model_the_optimizer_was_not_built_on(name: str) -> None:
    model, other = mlp(), mlp()
    opt = OPTIMIZERS[name](model, 100, hess_init=1e-2)
    x, _ = batch()
    other_before, model_before = snapshot(other), snapshot(model)
    with pytest.raises(
        ValueError, match=r"Invalid model: its parameters \(0.weight, 0.bias, 2.weight, \.\.\.\)"
    ):
        predict(other, opt, x, samples=3)
    assert_identical(other, other_before)
    assert_identical(model, model_before)
    assert predict(model, opt, x, samples=2).shape == (16, 3)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_nested_sampling_blocks_are_refused(name: str) -> None:
    model = mlp()
    opt = OPTIMIZERS[name](model, 100, hess_init=1e-2)
    mean = snapshot(model)
    x, y = batch()
    for inner_train in (False, True):
        with pytest.raises(RuntimeError, match="cannot be nested"):
            with opt.sampled_params(train=True), opt.sampled_params(train=inner_train):
                F.cross_entropy(model(x), y).backward()
        assert_identical(model, mean)
        assert opt._samples == 0
    train(opt, model, 1)  # the optimizer still works
    assert opt.steps == 1


@pytest.mark.parametrize("name", ["vogn", "slang", "noisy-kfac"])
def test_a_layer_registered_twice_or_tied_weights_are_refused_at_construction(name: str) -> None:
    shared = nn.Linear(4, 4)
    activation = nn.Tanh()  # a module without parameters may be reused
    with pytest.raises(ValueError, match="registered as 0 and 2"):
        OPTIMIZERS[name](
            nn.Sequential(shared, activation, shared, activation, nn.Linear(4, 3)), 100
        )
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    with pytest.raises(ValueError, match="parameter '2.weight' is shared by layers '0' and '2'"):
        OPTIMIZERS[name](nn.Sequential(first, activation, second, activation, nn.Linear(4, 3)), 100)
    OPTIMIZERS[name](nn.Sequential(nn.Linear(4, 4), activation, nn.Linear(4, 3), activation), 100)


def test_slang_refuses_a_bfloat16_model_and_skips_a_step_whose_svd_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ValueError, match="SLANG needs float32 or float64 parameters"):
        SLANG(mlp().to(torch.bfloat16), 100, rank=3)
    model = mlp()
    opt = SLANG(model, 100, rank=3)
    train(opt, model, 2)
    mean, state = snapshot(model), copy.deepcopy(opt.state_dict())
    x, y = batch()
    with opt.sampled_params(train=True):
        F.cross_entropy(model(x), y).backward()

    def diverging(*args: object, **kwargs: object) -> None:
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", diverging)
    monkeypatch.setattr(torch, "svd_lowrank", diverging)
    with pytest.warns(RuntimeWarning, match="failed to converge.*this step was skipped"):
        opt.step()
    assert_identical(model, mean)
    assert opt.steps == 2
    for key, value in state["variational"].items():
        now = opt.state_dict()["variational"][key]
        assert torch.equal(now, value) if isinstance(value, Tensor) else now == value
    monkeypatch.undo()
    train(opt, model, 1)  # the next step goes ahead
    assert opt.steps == 3


def first_noisy_kfac_format(state: dict) -> dict:
    """A state dict as the first NoisyKFAC wrote it: (A_γ⁻¹, G_γ⁻¹) as ``a_inverse/<layer>``
    and ``g_inverse/<layer>``, and no list of refreshed layers."""
    variational = {}
    for key, value in state["variational"].items():
        if key.startswith("derived:_inverses."):
            index, _, layer = key.removeprefix("derived:_inverses.").partition("/")
            key = f"{('a_inverse', 'g_inverse')[int(index)]}/{layer}"
        if key != "refreshed":
            variational[key] = value
    return {**state, "variational": variational}


@pytest.mark.parametrize("saved_at", [3, 4, 5])
@pytest.mark.parametrize("kind", ["noisy-kfac", "noisy-ekfac", "first-noisy-kfac-format"])
def test_a_round_trip_between_refreshes_continues_bit_for_bit(saved_at: int, kind: str) -> None:
    options = dict(lr=0.05, factor_update_steps=2, inv_update_steps=3)
    make = OPTIMIZERS["noisy-ekfac" if kind == "noisy-ekfac" else "noisy-kfac"]
    model = mlp()
    opt = make(model, 100, **options)
    train(opt, model, saved_at)
    twin = copy.deepcopy(model)
    twin_opt = make(twin, 100, **options)
    state = copy.deepcopy(opt.state_dict())
    if kind == "first-noisy-kfac-format":
        state = first_noisy_kfac_format(state)
        assert any(key.startswith("a_inverse/") for key in state["variational"])
    twin_opt.load_state_dict(state)
    torch.manual_seed(7)
    train(opt, model, 4)
    torch.manual_seed(7)
    train(twin_opt, twin, 4)
    assert_identical(twin, snapshot(model))
