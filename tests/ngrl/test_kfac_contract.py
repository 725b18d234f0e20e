"""KFAC as a torch optimizer: state_dict, param_groups, closures, schedules, bad input."""

from __future__ import annotations

import copy
import pickle
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ngrl import fisher_loss
from ngrl.curvature import available
from ngrl.curvature.diagonal import DiagonalBlock
from ngrl.optim import KFAC, CurvatureFallbackWarning, KFACConfig, kl_clip_scale
from tests.helpers.oracle import (
    capture_batch,
    flat_parameters,
    oracle_block,
    sample_classes,
)


def make(seed: int = 0, **kwargs: object) -> tuple[nn.Module, KFAC]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, KFAC(model, **kwargs)  # type: ignore[arg-type]


def train_step(model: nn.Module, opt: KFAC, seed: int) -> torch.Tensor:
    """One ACKTR-style step with data and sampled targets fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=generator)
    labels = torch.randint(0, 3, (16,), generator=generator)
    out = model(x)
    if opt.capture_due:
        with opt.capture():
            F.cross_entropy(out, sample_classes(out, seed)).backward(retain_graph=True)
    opt.zero_grad()
    loss = F.cross_entropy(out, labels)
    loss.backward()
    opt.step()
    return loss.detach()


def test_state_dict_round_trip_gives_the_same_next_step() -> None:
    """Saved at an ``inv_update_steps`` boundary, where the eigendecompositions (which are
    not saved) are recomputed anyway, a restored optimizer continues bit for bit."""
    model, opt = make(lr=0.1, factor_update_steps=2, inv_update_steps=3)
    for seed in range(3):
        train_step(model, opt, seed)
    state = opt.state_dict()
    assert {"a_factor", "g_factor", "momentum_buffer"} <= set(state["state"][0])

    clone, clone_opt = make(seed=1, lr=0.1, factor_update_steps=2, inv_update_steps=3)
    clone.load_state_dict(model.state_dict())
    clone_opt.load_state_dict(copy.deepcopy(state))
    assert clone_opt.steps == opt.steps == 3
    for seed in (10, 11):
        train_step(model, opt, seed)
        train_step(clone, clone_opt, seed)
        torch.testing.assert_close(flat_parameters(clone), flat_parameters(model))


@pytest.mark.parametrize("curvature", available())
@pytest.mark.parametrize("saved_at", [3, 4, 5])
def test_a_round_trip_at_any_step_continues_bit_for_bit(curvature: str, saved_at: int) -> None:
    """Off an ``inv_update_steps`` boundary the next steps use decompositions of older
    statistics; the state carries them, so the clone takes exactly the same steps."""
    options = dict(lr=0.1, curvature=curvature, factor_update_steps=2, inv_update_steps=3)
    model, opt = make(**options)
    for seed in range(saved_at):
        train_step(model, opt, seed)
    state = copy.deepcopy(opt.state_dict())
    clone, clone_opt = make(seed=1, **options)
    clone.load_state_dict(model.state_dict())
    clone_opt.load_state_dict(state)
    for seed in range(10, 14):
        train_step(model, opt, seed)
        train_step(clone, clone_opt, seed)
        assert torch.equal(flat_parameters(clone), flat_parameters(model)), (curvature, seed)


def test_a_corrupt_derived_state_is_refused_and_changes_nothing() -> None:
    model, opt = make(lr=0.1, inv_update_steps=3)
    for seed in range(4):
        train_step(model, opt, seed)
    good = copy.deepcopy(opt.state_dict())
    assert "derived" in good["state"][0]
    bad = copy.deepcopy(good)
    bad["state"][0]["derived"]["_eigen"][1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="derived '_eigen' is not finite"):
        opt.load_state_dict(bad)
    torch.testing.assert_close(opt.blocks["0"]._eigen[1], good["state"][0]["derived"]["_eigen"][1])


def test_load_state_dict_rejects_a_checkpoint_that_does_not_fit_and_keeps_its_state() -> None:
    model, opt = make(lr=0.1)
    train_step(model, opt, 0)
    good = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(good)
    bad["state"][0]["a_factor"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="does not fit"):
        opt.load_state_dict(bad)
    corrupt = copy.deepcopy(good)
    corrupt["state"][2]["g_factor"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        opt.load_state_dict(corrupt)
    torch.testing.assert_close(opt.blocks["0"].a_factor, good["state"][0]["a_factor"])
    torch.testing.assert_close(opt.blocks["2"].g_factor, good["state"][2]["g_factor"])


@pytest.mark.parametrize(
    ("saved", "loaded"),
    [("ekfac", "kfac"), ("kfac", "shampoo"), ("kfac", "mfac"), ("tkfac", "kfac")],
)
def test_a_state_of_another_curvature_is_refused_and_changes_nothing(
    saved: str, loaded: str
) -> None:
    source_model, source = make(lr=0.1, curvature=saved)
    train_step(source_model, source, 0)
    state = copy.deepcopy(source.state_dict())
    assert state["curvature"] == saved
    model, opt = make(lr=0.1, curvature=loaded)
    train_step(model, opt, 1)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=f"{saved!r} curvature statistics.*uses {loaded!r}"):
        opt.load_state_dict(state)
    # A state written before the optimizer named its curvature: the stray entries tell.
    del state["curvature"]
    with pytest.raises(ValueError, match="another curvature"):
        opt.load_state_dict(state)
    after = opt.state_dict()
    assert after["state"].keys() == before["state"].keys()
    for index, entry in before["state"].items():
        assert after["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            torch.testing.assert_close(after["state"][index][key], value)


def test_changed_lr_in_param_groups_takes_effect() -> None:
    model, opt = make(lr=0.1)
    train_step(model, opt, 0)
    opt.param_groups[0]["lr"] = 0.0
    before = flat_parameters(model)
    train_step(model, opt, 1)
    torch.testing.assert_close(flat_parameters(model), before)


def test_lr_scheduler_drives_the_learning_rate() -> None:
    model, opt = make(lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 1 else 1.0)
    train_step(model, opt, 0)
    scheduler.step()
    before = flat_parameters(model)
    train_step(model, opt, 1)
    torch.testing.assert_close(flat_parameters(model), before)


def test_step_returns_the_closure_loss() -> None:
    model, opt = make(lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with opt.capture():
        F.cross_entropy(model(x), sample_classes(model(x))).backward()

    losses: list[torch.Tensor] = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss)
        return loss

    before = flat_parameters(model)
    returned = opt.step(closure)
    assert len(losses) == 1 and returned is losses[0]
    assert not torch.equal(flat_parameters(model), before)


def test_hyperparameter_schedules_are_called_with_the_step() -> None:
    calls: list[int] = []

    def lr(step: int) -> float:
        calls.append(step)
        return 0.0 if step >= 1 else 0.1

    model, opt = make(lr=lr)
    train_step(model, opt, 0)
    before = flat_parameters(model)
    train_step(model, opt, 1)
    torch.testing.assert_close(flat_parameters(model), before)
    assert 0 in calls and 1 in calls


def test_factor_update_steps_sets_capture_due() -> None:
    model, opt = make(factor_update_steps=3)
    due = []
    for seed in range(6):
        due.append(opt.capture_due)
        train_step(model, opt, seed)
    assert due == [True, False, False, True, False, False]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("lr", -1.0),
        ("damping", 0.0),
        ("damping", float("nan")),
        ("kl_clip", -1e-3),
        ("momentum", 1.0),
        ("dampening", 1.5),
        ("weight_decay", -0.1),
        ("factor_decay", 1.0),
        ("factor_update_steps", 0),
        ("inv_update_steps", 2.5),
        ("lr", "fast"),
        ("stats_batch_size", 0),
        ("loss_reduction", "median"),
    ],
)
def test_bad_hyperparameters_raise_value_error_naming_the_argument(
    name: str, value: object
) -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        KFAC(model, **{name: value})  # type: ignore[arg-type]


def test_a_schedule_that_returns_a_bad_value_raises_at_step() -> None:
    model, opt = make(damping=lambda step: -1.0)
    with pytest.raises(ValueError, match="Invalid damping"):
        train_step(model, opt, 0)


def test_a_bad_skip_layers_pattern_is_named() -> None:
    with pytest.raises(ValueError, match="Invalid skip_layers pattern: '\\['"):
        KFAC(nn.Linear(2, 2), skip_layers=["["])


def test_unknown_curvature_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match="available: .*kfac"):
        KFAC(nn.Linear(2, 2), curvature="kfca")
    assert {"kfac", "diag"} <= set(available())


def test_model_without_parameters_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no trainable parameters"):
        KFAC(nn.Sequential(nn.ReLU(), nn.Flatten()))
    with pytest.raises(TypeError, match="nn.Module"):
        KFAC([torch.zeros(2, requires_grad=True)])  # type: ignore[arg-type]


def test_step_before_any_capture_is_a_plain_gradient_step_with_one_warning() -> None:
    model, opt = make(lr=0.1, momentum=0.0, kl_clip=None)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    before = flat_parameters(model)
    with pytest.warns(RuntimeWarning, match="plain gradient steps"):
        opt.step()
    torch.testing.assert_close(flat_parameters(model), before - 0.1 * grads)


def test_skip_layers_get_plain_gradient_steps() -> None:
    model, opt = make(lr=0.1, momentum=0.0, kl_clip=None, skip_layers=[r"^2$"])
    assert set(opt.blocks) == {"0"}
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    capture_batch(opt, model, x, sample_classes(model(x)))
    F.cross_entropy(model(x), y).backward()
    grad = model[2].weight.grad.clone()
    before = model[2].weight.detach().clone()
    opt.step()
    torch.testing.assert_close(model[2].weight.detach(), before - 0.1 * grad)


def test_precondition_in_place_hands_the_natural_gradient_to_another_optimizer() -> None:
    model, opt = make(lr=0.1, momentum=0.0)
    twin = copy.deepcopy(model)
    twin_opt = KFAC(twin, lr=0.1, momentum=0.0)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    targets = sample_classes(model(x))
    capture_batch(opt, model, x, targets)
    capture_batch(twin_opt, twin, x, targets)
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(twin(x), y).backward()
    opt.step()
    assert twin_opt.precondition_()
    sgd.step()
    torch.testing.assert_close(flat_parameters(twin), flat_parameters(model))


def test_natural_gradient_is_a_steps_direction_and_changes_nothing() -> None:
    model, opt = make(lr=1.0, momentum=0.0, kl_clip=None)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    capture_batch(opt, model, x, sample_classes(model(x)))
    F.cross_entropy(model(x), y).backward()
    opt.step()  # the first step computes the decompositions; the next refresh is at 10
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    other = [torch.randn_like(p) for p in model.parameters()]
    found = opt.natural_gradient(other)
    assert found is not None and opt.steps == 1
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    doubled = opt.natural_gradient([2 * g for g in other])
    assert doubled is not None
    for a, b in zip(found, doubled, strict=True):
        torch.testing.assert_close(2 * a, b)
    # Without trust region, momentum or refresh, a step of lr 1 moves by exactly that.
    direction = opt.natural_gradient(grads)
    assert direction is not None
    before = flat_parameters(model)
    opt.step()
    torch.testing.assert_close(
        before - flat_parameters(model), torch.cat([d.flatten() for d in direction])
    )
    with pytest.warns(RuntimeWarning, match="non-finite gradients"):
        assert opt.natural_gradient([torch.full_like(g, float("nan")) for g in grads]) is None
    with pytest.raises(ValueError, match="grads has 3 entries, the optimizer 4"):
        opt.natural_gradient(grads[:3])
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))


def test_same_seed_gives_the_same_parameters() -> None:
    results = []
    for _ in range(2):
        model, opt = make(seed=3, lr=0.1)
        for seed in range(5):
            train_step(model, opt, seed)
        results.append(flat_parameters(model))
    assert torch.equal(results[0], results[1])


@pytest.mark.usefixtures("float64")
def test_other_layers_get_a_diagonal_block_exact_for_one_example() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 3))
    with pytest.warns(CurvatureFallbackWarning, match=r"for 1 \(PReLU\): they take a diagonal"):
        opt = KFAC(model)
    assert isinstance(opt.blocks["1"], DiagonalBlock)
    assert opt.fallbacks == {"1": "DiagonalBlock (PReLU)"}
    x = torch.randn(1, 3)
    targets = sample_classes(model(x))
    capture_batch(opt, model, x, targets)
    exact = oracle_block(model, x, targets, "1")
    torch.testing.assert_close(opt.blocks["1"].to_dense(), torch.diag(exact.diagonal()))


class ScaledLogits(nn.Module):
    """A bare parameter read outside ``forward`` (like SB3's ``log_std``)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.log_scale = nn.Parameter(torch.tensor([0.3, -0.2]))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.log_scale.exp()


def test_a_bare_parameter_outside_forward_is_scaled_by_the_batch_size() -> None:
    """Its gradient sample is ``sqrt(N)·∇L`` with N the batch of the captured pass."""
    model = ScaledLogits()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvatureFallbackWarning)  # listed, not warned about
        assert KFAC(model).fallbacks == {"": "DiagonalBlock (ScaledLogits)"}
    opt = KFAC(model)
    x = torch.randn(6, 3)
    logits = model.logits(x)
    targets = sample_classes(logits)
    with opt.capture():
        F.cross_entropy(logits, targets).backward()
    (grad,) = torch.autograd.grad(F.cross_entropy(model.logits(x), targets), [model.log_scale])
    torch.testing.assert_close(opt.blocks[""].to_dense(), torch.diag(6 * grad.square()))


@pytest.mark.usefixtures("float64")
def test_diag_curvature_is_the_exact_fisher_diagonal() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = KFAC(model, curvature="diag")
    x = torch.randn(9, 3)
    targets = sample_classes(model(x))
    capture_batch(opt, model, x, targets)
    for name in ("0", "2"):
        exact = oracle_block(model, x, targets, name)
        torch.testing.assert_close(opt.blocks[name].to_dense(), torch.diag(exact.diagonal()))


def test_remove_hooks_detaches_the_optimizer_from_the_model() -> None:
    model, opt = make()
    opt.remove_hooks()
    with opt.capture():
        F.cross_entropy(model(torch.randn(4, 4)), torch.zeros(4, dtype=torch.long)).backward()
    assert not any(block.initialized for block in opt.blocks.values())


@pytest.mark.parametrize(
    ("quadratic", "lr", "kl_clip", "expected"),
    [
        (4.0, 0.5, 1e-2, (1e-2 / (0.25 * 4.0)) ** 0.5),  # clipped: lr²ν²q = kl_clip
        (1e-6, 0.1, 1e-3, 1.0),  # inside the region: untouched
        (0.0, 0.1, 1e-3, 1.0),  # zero gradient
        (4.0, 0.5, None, 1.0),  # trust region disabled
    ],
)
def test_kl_clip_scale(quadratic: float, lr: float, kl_clip: float | None, expected: float) -> None:
    assert kl_clip_scale(quadratic, lr, kl_clip) == pytest.approx(expected)


@pytest.mark.parametrize("curvature", available())
def test_tied_weights_are_refused_at_construction_naming_the_parameter(curvature: str) -> None:
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second)
    with pytest.raises(ValueError, match="parameter '2.weight' is shared by layers '0' and '2'"):
        KFAC(model, curvature=curvature)
    # Leaving one of the layers out is the documented way to train it anyway.
    opt = KFAC(model, curvature=curvature, skip_layers=["^2$"])
    assert [layer.name for layer in opt.layers] == ["0"]


def part_gradients(model: nn.Module, loss: torch.Tensor) -> list[torch.Tensor | None]:
    grads = torch.autograd.grad(
        loss, list(model.parameters()), retain_graph=True, allow_unused=True
    )
    return list(grads)


def captured_model(seed: int = 0, **kwargs: object) -> tuple[nn.Module, KFAC, torch.Tensor]:
    model, opt = make(seed, **kwargs)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(seed))
    out = model(x)
    with opt.capture():
        F.cross_entropy(out, sample_classes(out, seed)).backward(retain_graph=True)
    opt.zero_grad()
    return model, opt, x


def test_step_parts_with_one_part_is_step() -> None:
    options = dict(lr=0.2, momentum=0.9, weight_decay=1e-3, kl_clip=1e-4)
    model, opt, x = captured_model(**options)
    twin = copy.deepcopy(model)
    twin_opt = KFAC(twin, **options)  # type: ignore[arg-type]
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    labels = torch.arange(16) % 3
    F.cross_entropy(model(x), labels).backward()
    opt.step()
    grads = part_gradients(twin, F.cross_entropy(twin(x), labels))
    assert twin_opt.step_parts([(grads, 1e-4)])
    torch.testing.assert_close(flat_parameters(twin), flat_parameters(model), rtol=0, atol=0)
    assert (
        twin_opt.trust_region_scales == opt.trust_region_scales and opt.trust_region_scales[0] < 1
    )


def test_step_parts_scales_each_part_to_its_own_trust_region() -> None:
    """``d = Σ ν_i X_i`` with each ``ν_i`` from its own quadratic; a clipped part's
    predicted KL ``lr² ν_i² ⟨X_i, ∇_i⟩`` is its radius."""
    lr = 0.5
    model, opt, x = captured_model(lr=lr, momentum=0.0, kl_clip=None)
    labels = torch.arange(16) % 3
    out = model(x)
    first = part_gradients(model, F.cross_entropy(out, labels))
    second = part_gradients(model, 3.0 * out.square().mean())
    radii = (1e-4, 1e-1)
    before = flat_parameters(model)
    for block in opt.blocks.values():
        block.refresh(1e-2)
    expected = torch.zeros_like(before)
    for grads, radius in zip((first, second), radii, strict=True):
        xs, quadratic = [], 0.0
        for layer in opt.layers:
            grad = layer.gather([grads[i] for i in layer_positions(model, layer.params)])
            x_layer = opt.blocks[layer.name].precondition(grad, 1e-2)
            quadratic += float((x_layer * grad).sum())
            xs.extend(layer.scatter(x_layer))
        scale = kl_clip_scale(quadratic, lr, radius)
        if radius == 1e-4:
            assert scale < 1 and lr**2 * scale**2 * quadratic == pytest.approx(radius)
        expected += scale * torch.cat([t.reshape(-1) for t in xs])
    assert opt.step_parts([(first, radii[0]), (second, radii[1])])
    torch.testing.assert_close(before - flat_parameters(model), lr * expected)
    assert len(opt.trust_region_scales) == 2 and opt.trust_region_scales[0] < 1
    total = [a + b for a, b in zip(first, second, strict=True)]
    for param, grad in zip(model.parameters(), total, strict=True):
        torch.testing.assert_close(param.grad, grad)


def test_a_non_finite_part_skips_the_whole_step() -> None:
    model, opt, x = captured_model(lr=0.2)
    good = part_gradients(model, F.cross_entropy(model(x), torch.arange(16) % 3))
    bad = [g.clone() for g in good]
    bad[0][0, 0] = float("nan")
    before, steps = flat_parameters(model), opt.steps
    with pytest.warns(RuntimeWarning, match="non-finite gradients; this step was skipped"):
        assert not opt.step_parts([(good, 1e-3), (bad, 1e-3)])
    assert torch.equal(flat_parameters(model), before) and opt.steps == steps
    assert all("momentum_buffer" not in opt.state[p] for p in model.parameters())


def layer_positions(model: nn.Module, params: list[torch.Tensor]) -> list[int]:
    ids = [id(p) for p in model.parameters()]
    return [ids.index(id(p)) for p in params]


# --- one typed configuration ---------------------------------------------------------------
def test_a_config_builds_the_same_optimizer_as_its_keyword_arguments() -> None:
    config = KFACConfig(damping=0.05, kl_clip=1e-2, curvature="tkfac", stats_batch_size=8)
    model_a, by_kwargs = make(damping=0.05, kl_clip=1e-2, curvature="tkfac", stats_batch_size=8)
    model_b, _ = make()
    by_config = KFAC.from_config(model_b, config)
    assert by_config.config == by_kwargs.config == config
    for seed in range(3):
        train_step(model_a, by_kwargs, seed)
        train_step(model_b, by_config, seed)
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_config_shows_the_values_a_scheduler_set() -> None:
    _, opt = make(damping=0.05)
    opt.param_groups[0]["damping"] = 0.2
    assert opt.config.damping == 0.2
    assert opt.config.replace(damping=0.3).damping == 0.3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"damping": 0.0}, "Invalid damping value"),
        ({"curvature": "kfca"}, "kfac"),
        ({"weight_sharing": "x"}, "Invalid weight_sharing"),
        ({"grad_worker_fraction": 2.0}, "Invalid grad_worker_fraction"),
        ({"dampingg": 1.0}, "Invalid K-FAC option.*dampingg.*damping"),
    ],
)
def test_a_bad_config_names_the_field(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KFACConfig.from_options(**options)


def test_a_config_is_frozen_and_pickles() -> None:
    config = KFACConfig(curvature_options={"damping_rule": "factored"}, skip_layers="head")
    assert config.skip_layers == ("head",)
    with pytest.raises(AttributeError):
        config.damping = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.curvature_options["damping_rule"] = "exact"  # type: ignore[index]
    assert pickle.loads(pickle.dumps(config)) == config


def test_step_parts_refreshes_a_layer_that_only_a_later_part_reaches() -> None:
    """Two heads on one trunk, each reached by one part: with ``inv_update_steps=1`` both
    heads' decompositions follow their factors, not only the first part's layers."""

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk, self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = torch.tanh(self.trunk(x))
            return self.a(h), self.b(h)

    torch.manual_seed(0)
    model = TwoHeads()
    opt = KFAC(model, lr=0.1, damping=1e-2, momentum=0.0, inv_update_steps=1, factor_decay=0.5)
    refreshes = {name: 0 for name in opt.blocks}
    for name, block in opt.blocks.items():
        original = block.refresh

        def counted(damping: float, name: str = name, original: Any = original) -> None:
            refreshes[name] += 1
            original(damping)

        block.refresh = counted  # type: ignore[method-assign]
    for step in range(3):
        x = torch.randn(16, 4)
        out_a, out_b = model(x)
        with opt.capture():
            (fisher_loss(out_a, "categorical") + fisher_loss(out_b, "categorical")).backward(
                retain_graph=True
            )
        opt.zero_grad()
        part_a = torch.autograd.grad(
            out_a.square().mean(), list(model.parameters()), retain_graph=True, allow_unused=True
        )
        part_b = torch.autograd.grad(
            out_b.square().mean(), list(model.parameters()), allow_unused=True
        )
        assert opt.step_parts([(part_a, 1e-3), (part_b, 1e-3)])
        # Each layer once per step, the trunk (reached by both parts) included.
        assert refreshes == {"trunk": step + 1, "a": step + 1, "b": step + 1}
    grad = torch.randn(2, 7)
    fresh = copy.deepcopy(opt.blocks["b"])
    fresh.refresh(1e-2)
    torch.testing.assert_close(
        opt.blocks["b"].precondition(grad, 1e-2), fresh.precondition(grad, 1e-2)
    )
