"""Every curvature approximation against the exact Fisher block (ngrl.fisher), in float64
on a tiny MLP and a tiny CNN: the damped solve, checkpoints, the Frobenius ordering the
papers prove, and each method's own defining formula."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngrl.curvature import available, get_block_class
from ngrl.curvature.base import CurvatureBlock, pi_split
from ngrl.fisher import layer_indices, per_example_gradients
from ngrl.optim import KFAC
from tests.helpers.oracle import ce_sum, damped_solve, fit, oracle_block, sample_classes

pytestmark = pytest.mark.usefixtures("float64")

DAMPING = 1e-2
# The two-term approximations may be indefinite (their correction is a best fit, not a
# covariance): their solves are checked at a damping that makes the damped matrix SPD.
TWO_TERM_DAMPING = 0.1
# Power iterations run to convergence so that the Frobenius-optimal claims are exact.
CONVERGED = {"power_iterations": 2000, "tolerance": 1e-13}
OPTIONS: dict[str, dict[str, object]] = {
    "kpsvd": CONVERGED,
    "deflation": CONVERGED,
    "kfac-corrected": CONVERGED,
    "mfac": {"window": 64},
}
TWO_TERM = ("kfac-corrected", "deflation")


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(12, 3),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], tuple[str, ...]]] = {
    "mlp": (mlp, (4,), ("0", "2")),
    "cnn": (cnn, (2, 4, 4), ("0", "3")),
}


def captured(
    name: str, model_kind: str, batches: int = 1, n: int = 16, **options: object
) -> tuple[KFAC, nn.Module, Tensor, Tensor]:
    """A model and a K-FAC optimizer with ``curvature=name`` after ``batches`` captured
    passes of the sampled-target loss; returns the last batch's inputs and targets."""
    torch.manual_seed(0)  # every call with the same arguments sees the same model and data
    make, shape, _ = MODELS[model_kind]
    model = make()
    merged = {**OPTIONS.get(name, {}), **options}
    opt = KFAC(model, curvature=name, curvature_options=merged, factor_decay=0.0)
    for _ in range(batches):
        x = torch.randn(n, *shape)
        targets = sample_classes(model(x), seed=int(torch.randint(0, 10**6, ())))
        with opt.capture():
            F.cross_entropy(model(x), targets).backward()
        opt.zero_grad()
    return opt, model, x, targets


def frobenius_error(block: CurvatureBlock, exact: Tensor) -> float:
    return float((block.to_dense() - exact).norm() / exact.norm())


def rearranged(block: Tensor, d_out: int, d_in: int) -> Tensor:
    """Van Loan's ``R(F)``: ``‖F − B ⊗ C‖_F = ‖R(F) − vec(B) vec(C)ᵀ‖_F``."""
    return block.reshape(d_out, d_in, d_out, d_in).permute(0, 2, 1, 3).reshape(d_out**2, d_in**2)


# --- every block ----------------------------------------------------------------------
@pytest.mark.parametrize("model_kind", sorted(MODELS))
@pytest.mark.parametrize("name", available())
def test_precondition_solves_the_damped_dense_block(name: str, model_kind: str) -> None:
    options = {"damping_rule": "exact"} if name in TWO_TERM else {}
    damping = TWO_TERM_DAMPING if name in TWO_TERM else DAMPING
    opt, _, _, _ = captured(name, model_kind, batches=2, **options)
    for layer in MODELS[model_kind][2]:
        block = opt.blocks[layer]
        block.refresh(damping)
        dense = block.to_dense()
        assert float(torch.linalg.eigvalsh(dense).min()) > -damping
        grad = torch.randn(block.shape)
        expected = damped_solve(dense, grad.reshape(-1), damping)
        torch.testing.assert_close(block.precondition(grad, damping).reshape(-1), expected)


@pytest.mark.parametrize("model_kind", sorted(MODELS))
@pytest.mark.parametrize("name", TWO_TERM)
def test_two_term_blocks_factored_damping_inverts_the_paper_matrix(
    name: str, model_kind: str
) -> None:
    opt, _, _, _ = captured(name, model_kind, batches=2)
    for layer in MODELS[model_kind][2]:
        block = opt.blocks[layer]
        block.refresh(TWO_TERM_DAMPING)
        g1, a1, g2, a2 = block.terms()
        a_damping, g_damping = pi_split(a1, g1, TWO_TERM_DAMPING)
        paper = torch.kron(g1 + g_damping * torch.eye(len(g1)), a1 + a_damping * torch.eye(len(a1)))
        paper = paper + torch.kron(g2, a2)
        assert float(torch.linalg.eigvalsh(paper).min()) > 0.0
        grad = torch.randn(block.shape)
        expected = torch.linalg.solve(paper, grad.reshape(-1))
        torch.testing.assert_close(block.precondition(grad, TWO_TERM_DAMPING).reshape(-1), expected)


@pytest.mark.parametrize("damping_rule", ["factored", "exact"])
@pytest.mark.parametrize("name", TWO_TERM)
def test_two_term_blocks_step_downhill_when_the_sum_is_indefinite(
    name: str, damping_rule: str
) -> None:
    opt, _, _, _ = captured(name, "cnn", batches=2, damping_rule=damping_rule)
    block = opt.blocks["0"]
    damping = 1e-4
    assert float(torch.linalg.eigvalsh(block.damped_dense(damping)).min()) < 0.0
    block.refresh(damping)
    for _ in range(5):
        grad = torch.randn(block.shape)
        x = block.precondition(grad, damping)
        assert torch.isfinite(x).all()
        assert float((x * grad).sum()) > 0.0


@pytest.mark.parametrize("model_kind", sorted(MODELS))
@pytest.mark.parametrize("name", available())
def test_state_dict_round_trips_and_bad_checkpoints_are_refused(name: str, model_kind: str) -> None:
    opt, model, _, _ = captured(name, model_kind, batches=2)
    state = copy.deepcopy(opt.state_dict())
    clone = KFAC(copy.deepcopy(model), curvature=name, curvature_options=OPTIONS.get(name, {}))
    clone.load_state_dict(state)
    for layer in MODELS[model_kind][2]:
        original, restored = opt.blocks[layer], clone.blocks[layer]
        torch.testing.assert_close(restored.to_dense(), original.to_dense())
        original.refresh(DAMPING)
        restored.refresh(DAMPING)
        grad = torch.randn(original.shape)
        torch.testing.assert_close(
            restored.precondition(grad, DAMPING), original.precondition(grad, DAMPING)
        )
    first = next(iter(state["state"].values()))
    key = next(k for k in first if k not in ("momentum_buffer", "cursor"))
    first[key] = torch.full_like(first[key], float("nan"))
    before = opt.blocks[MODELS[model_kind][2][0]].to_dense()
    with pytest.raises(ValueError, match="not finite"):
        opt.load_state_dict(state)
    torch.testing.assert_close(opt.blocks[MODELS[model_kind][2][0]].to_dense(), before)


@pytest.mark.parametrize("name", available())
def test_every_curvature_trains_a_model_through_kfac(name: str) -> None:
    torch.manual_seed(3)
    model = mlp()
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    opt = KFAC(model, curvature=name, lr=0.1, kl_clip=1e-2, damping=1e-2, momentum=0.0)
    first, last = fit(opt, model, x, y, steps=30)
    assert last < 0.8 * first


def test_unknown_curvature_lists_every_registered_name() -> None:
    with pytest.raises(ValueError) as error:
        KFAC(mlp(), curvature="kfca")
    for name in ("ekfac", "tkfac", "kpsvd", "kfac-corrected", "deflation", "mfac", "shampoo"):
        assert name in str(error.value)


@pytest.mark.parametrize(
    ("name", "options", "argument"),
    [
        ("mfac", {"window": 0}, "window"),
        ("shampoo", {"exponent": 2.0}, "exponent"),
        ("shampoo", {"grafting": "adagrad"}, "grafting"),
        ("kpsvd", {"power_iterations": 0}, "power_iterations"),
        ("deflation", {"damping_rule": "pi"}, "damping_rule"),
        ("ekfac", {"damping_rule": "factored"}, "ekfac"),
    ],
)
def test_bad_options_name_the_argument(name: str, options: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        KFAC(mlp(), curvature=name, curvature_options=options)


# --- the Frobenius ordering -----------------------------------------------------------
@pytest.mark.parametrize("model_kind", sorted(MODELS))
def test_frobenius_errors_are_ordered_as_the_papers_prove(model_kind: str) -> None:
    errors: dict[str, dict[str, float]] = {}
    for name in ("kfac", "ekfac", "kpsvd", "kfac-corrected", "deflation"):
        opt, model, x, targets = captured(name, model_kind)
        errors[name] = {
            layer: frobenius_error(opt.blocks[layer], oracle_block(model, x, targets, layer))
            for layer in MODELS[model_kind][2]
        }
    slack = 1e-10
    for layer in MODELS[model_kind][2]:
        kfac = errors["kfac"][layer]
        assert kfac > 1e-3  # the statistics are dependent: K-FAC is not exact here
        assert errors["kpsvd"][layer] <= kfac + slack
        assert errors["ekfac"][layer] <= kfac + slack
        assert errors["kfac-corrected"][layer] < kfac
        assert errors["deflation"][layer] <= errors["kpsvd"][layer] + slack


@pytest.mark.parametrize("model_kind", sorted(MODELS))
def test_tkfac_keeps_the_exact_trace(model_kind: str) -> None:
    opt, model, x, targets = captured("tkfac", model_kind)
    for layer in MODELS[model_kind][2]:
        exact = oracle_block(model, x, targets, layer)
        torch.testing.assert_close(opt.blocks[layer].to_dense().trace(), exact.trace())
        kfac = torch.kron(opt.blocks[layer].g_factor, opt.blocks[layer].a_factor)
        ratio = opt.blocks[layer].to_dense() / kfac
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0, 0])))


# --- each method's own formula --------------------------------------------------------
@pytest.mark.parametrize("model_kind", sorted(MODELS))
def test_kpsvd_factors_are_the_top_singular_pair_of_the_rearranged_block(model_kind: str) -> None:
    opt, model, x, targets = captured("kpsvd", model_kind)
    for layer in MODELS[model_kind][2]:
        block = opt.blocks[layer]
        d_out, d_in = block.shape
        u, s, vh = torch.linalg.svd(rearranged(oracle_block(model, x, targets, layer), d_out, d_in))
        product = torch.outer(block.g_factor.reshape(-1), block.a_factor.reshape(-1))
        torch.testing.assert_close(product, s[0] * torch.outer(u[:, 0], vh[0]))
        torch.testing.assert_close(block.a_factor.norm() ** 2, s[0])
        assert float(torch.linalg.eigvalsh(block.a_factor).min()) > -1e-10  # PSD


@pytest.mark.parametrize("model_kind", sorted(MODELS))
def test_deflation_is_the_rank_two_kronecker_svd(model_kind: str) -> None:
    opt, model, x, targets = captured("deflation", model_kind)
    for layer in MODELS[model_kind][2]:
        block = opt.blocks[layer]
        d_out, d_in = block.shape
        u, s, vh = torch.linalg.svd(rearranged(oracle_block(model, x, targets, layer), d_out, d_in))
        rank_two = s[0] * torch.outer(u[:, 0], vh[0]) + s[1] * torch.outer(u[:, 1], vh[1])
        torch.testing.assert_close(rearranged(block.to_dense(), d_out, d_in), rank_two)


@pytest.mark.parametrize("model_kind", sorted(MODELS))
def test_kfac_corrected_adds_the_best_kronecker_term_of_the_residual(model_kind: str) -> None:
    opt, model, x, targets = captured("kfac-corrected", model_kind)
    kfac, _, _, _ = captured("kfac", model_kind)  # same seed: the same batch
    for layer in MODELS[model_kind][2]:
        block = opt.blocks[layer]
        d_out, d_in = block.shape
        g1, a1, g2, a2 = block.terms()
        torch.testing.assert_close(torch.kron(g1, a1), kfac.blocks[layer].to_dense())
        residual = oracle_block(model, x, targets, layer) - torch.kron(g1, a1)
        u, s, vh = torch.linalg.svd(rearranged(residual, d_out, d_in))
        torch.testing.assert_close(
            torch.outer(g2.reshape(-1), a2.reshape(-1)), s[0] * torch.outer(u[:, 0], vh[0])
        )


@pytest.mark.parametrize("model_kind", sorted(MODELS))
def test_ekfac_is_the_best_diagonal_in_the_kfac_eigenbasis(model_kind: str) -> None:
    opt, model, x, targets = captured("ekfac", model_kind)
    for layer in MODELS[model_kind][2]:
        block = opt.blocks[layer]
        _, a_basis = torch.linalg.eigh(block.kfac.a_factor)
        _, g_basis = torch.linalg.eigh(block.kfac.g_factor)
        basis = torch.kron(g_basis, a_basis)
        exact = oracle_block(model, x, targets, layer)
        best = basis @ torch.diag((basis.T @ exact @ basis).diagonal()) @ basis.T
        torch.testing.assert_close(block.to_dense(), best)


def test_ekfac_carries_its_scalings_into_a_new_eigenbasis() -> None:
    opt, model, _, _ = captured("ekfac", "mlp")
    block = opt.blocks["2"]
    x = torch.randn(16, 4)
    with opt.capture():  # new factors; S is re-estimated in the old basis until a refresh
        F.cross_entropy(model(x), sample_classes(model(x))).backward()
    before = block.to_dense()
    block.refresh(DAMPING)
    _, a_basis = torch.linalg.eigh(block.kfac.a_factor)
    _, g_basis = torch.linalg.eigh(block.kfac.g_factor)
    basis = torch.kron(g_basis, a_basis)
    carried = basis @ torch.diag((basis.T @ before @ basis).diagonal()) @ basis.T
    torch.testing.assert_close(block.to_dense(), carried)
    assert float((carried - before).norm()) > 1e-6 * float(before.norm())  # the basis moved


def test_mfac_is_the_damped_inverse_of_the_windowed_empirical_fisher() -> None:
    model = mlp()
    opt = KFAC(model, curvature="mfac", curvature_options={"window": 6})
    inputs, targets = [], []
    for _ in range(3):  # 15 examples through a window of 6: the ring buffer wraps twice
        x = torch.randn(5, 4)
        y = sample_classes(model(x), seed=len(inputs))
        with opt.capture():
            F.cross_entropy(model(x), y).backward()
        inputs.append(x)
        targets.append(y)
    x, y = torch.cat(inputs)[-6:], torch.cat(targets)[-6:]
    grads = per_example_gradients(model, ce_sum, x, y)
    for layer in ("0", "2"):
        idx = layer_indices(model, layer)
        window = grads[:, idx]
        exact = window.T @ window / 6
        block = opt.blocks[layer]
        torch.testing.assert_close(block.to_dense(), exact)
        grad = torch.randn(block.shape)
        torch.testing.assert_close(
            block.precondition(grad, DAMPING).reshape(-1),
            damped_solve(exact, grad.reshape(-1), DAMPING),
        )


def matrix_power(matrix: Tensor, exponent: float) -> Tensor:
    """``M^p`` of a PSD matrix; eigenvalues at rounding level (below 1e-12 of the largest)
    count as zero, as in the block (their p-th roots would be noise of order 1e-4)."""
    values, vectors = torch.linalg.eigh(matrix)
    values = torch.where(values > 1e-12 * values.max(), values, torch.zeros_like(values))
    return (vectors * values.pow(exponent)) @ vectors.T


@pytest.mark.parametrize("model_kind", sorted(MODELS))
@pytest.mark.parametrize("exponent", [0.25, 0.5])
def test_shampoo_matches_its_dense_formula(model_kind: str, exponent: float) -> None:
    opt, model, x, targets = captured("shampoo", model_kind, exponent=exponent)
    grads = per_example_gradients(model, ce_sum, x, targets)
    for layer in MODELS[model_kind][2]:
        block = opt.blocks[layer]
        per_example = grads[:, layer_indices(model, layer)].reshape(-1, *block.shape)
        left = torch.einsum("noi,npi->op", per_example, per_example) / len(x)
        right = torch.einsum("noi,noj->ij", per_example, per_example) / len(x)
        dense = torch.kron(matrix_power(left, exponent), matrix_power(right, exponent))
        torch.testing.assert_close(block.to_dense(), dense)
        grad = torch.randn(block.shape)
        torch.testing.assert_close(
            block.precondition(grad, DAMPING).reshape(-1),
            damped_solve(dense, grad.reshape(-1), DAMPING),
        )


@pytest.mark.parametrize("model_kind", sorted(MODELS))
@pytest.mark.parametrize("grafting", ["sgd", "adam"])
def test_shampoo_grafting_keeps_the_direction_and_takes_the_other_norm(
    grafting: str, model_kind: str
) -> None:
    opt, model, x, targets = captured("shampoo", model_kind, grafting=grafting, graft_epsilon=1e-8)
    plain, _, _, _ = captured("shampoo", model_kind)
    grads = per_example_gradients(model, ce_sum, x, targets)
    for layer in MODELS[model_kind][2]:
        block, reference = opt.blocks[layer], plain.blocks[layer]
        grad = torch.randn(block.shape)
        direction = reference.precondition(grad, DAMPING)
        grafted = block.precondition(grad, DAMPING)
        if grafting == "sgd":
            norm = grad.norm()
        else:
            moment = grads[:, layer_indices(model, layer)].square().mean(0).reshape(block.shape)
            norm = (grad / (moment.sqrt() + 1e-8)).norm()
        torch.testing.assert_close(grafted, direction * (norm / direction.norm()))


def test_every_registered_block_is_built_with_its_shape() -> None:
    for name in available():
        block = get_block_class(name)((3, 5), **OPTIONS.get(name, {}))
        assert tuple(block.shape) == (3, 5)
        assert not block.initialized


@pytest.mark.parametrize("name", ["kpsvd", "kfac-corrected", "deflation"])
def test_a_batch_whose_derived_statistics_overflow_is_dropped(name: str) -> None:
    torch.set_default_dtype(torch.float32)  # where 1e20² overflows
    model = mlp()
    opt = KFAC(model, curvature=name)
    x = torch.randn(8, 4)
    with opt.capture():
        F.cross_entropy(model(x), sample_classes(model(x))).backward()
    before = {k: v.clone() for k, v in opt.blocks["0"].state_dict().items()}
    huge = 1e20 * torch.randn(8, 4)  # finite inputs whose Kronecker statistics are not
    with pytest.warns(RuntimeWarning, match="non-finite curvature statistics"):
        with opt.capture():
            F.cross_entropy(model(huge), sample_classes(model(huge))).backward()
    for key, value in opt.blocks["0"].state_dict().items():
        torch.testing.assert_close(value, before[key])


def dense_power(matrix: Tensor, power: float) -> Tensor:
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return (vectors * values.pow(power)) @ vectors.T


# The powers each block takes exactly (−1 is the preconditioner, checked above).
POWERS: dict[str, tuple[float, ...]] = {name: (-0.5, 1.0, 2.0) for name in available()}
POWERS.update({"kfac-corrected": (1.0,), "deflation": (1.0,)})


# Blocks with a factored damping rule beside the exact one.
FACTORED = ("kfac", "tkfac", "kpsvd", *TWO_TERM)
DAMPING_RULES = [
    (name, rule)
    for name in available()
    for rule in ("exact", "factored")
    if rule == "exact" or name in FACTORED
]


@pytest.mark.parametrize("model_kind", sorted(MODELS))
@pytest.mark.parametrize(("name", "damping_rule"), DAMPING_RULES)
def test_multiply_matpower_is_the_dense_matrix_power(
    name: str, damping_rule: str, model_kind: str
) -> None:
    """``(F̂ + λI)^p v`` against the dense matrix power of :meth:`damped_dense` (the
    matrix ``precondition`` inverts), for −1, −½, +1 and +2 where the block takes them."""
    options = {"damping_rule": damping_rule} if name in FACTORED else {}
    damping = TWO_TERM_DAMPING if name in TWO_TERM else DAMPING
    opt, _, _, _ = captured(name, model_kind, batches=2, **options)
    for layer in MODELS[model_kind][2]:
        block = opt.blocks[layer]
        block.refresh(damping)
        dense = block.damped_dense(damping)
        v = torch.randn(block.shape)
        for power in (-1.0, *POWERS[name]):
            if name in TWO_TERM and power == -1.0 and damping_rule == "factored":
                continue  # the factored two-term solve is a preconditioner, not the inverse
            expected = dense_power(dense, power) @ v.reshape(-1)
            got = block.multiply_matpower(v, damping, power).reshape(-1)
            torch.testing.assert_close(got, expected, msg=f"{name} {layer} power {power}")
        if name in TWO_TERM:
            with pytest.raises(
                NotImplementedError,
                match=f"{get_block_class(name).__name__} has no exact matrix power -0.5",
            ):
                block.multiply_matpower(v, damping, -0.5)


def test_a_grafted_shampoo_step_is_not_a_matrix_power() -> None:
    opt, _, _, _ = captured("shampoo", "mlp", batches=2, grafting="sgd")
    block = opt.blocks["0"]
    with pytest.raises(NotImplementedError, match="ShampooBlock has no exact matrix power 0.5"):
        block.multiply_matpower(torch.randn(block.shape), DAMPING, 0.5)


@pytest.mark.parametrize(
    ("name", "damping_rule"),
    [*((name, "exact") for name in available() if name not in TWO_TERM), ("kfac", "factored")],
)
def test_sample_matpower_draws_with_the_matrix_power_as_covariance(
    name: str, damping_rule: str
) -> None:
    """``(F̂ + λI)^{-½} z``, z white: covariance ``(F̂ + λI)^{-1}`` (whitened, ≈ I)."""
    options = {"damping_rule": damping_rule} if name in FACTORED else {}
    opt, _, _, _ = captured(name, "mlp", batches=2, **options)
    block = opt.blocks["2"]
    block.refresh(DAMPING)
    torch.manual_seed(1)
    draws = torch.stack([block.sample_matpower(DAMPING, -0.5).reshape(-1) for _ in range(6000)])
    whitening = dense_power(block.damped_dense(DAMPING), 0.5)
    white = draws @ whitening  # covariance I if the draws' covariance is (F̂ + λI)^{-1}
    empirical = white.T @ white / len(draws)
    size = empirical.shape[0]  # 18: ‖error‖_F ≈ sqrt(P(P+1)/draws) ≈ 0.24
    assert torch.linalg.matrix_norm(empirical - torch.eye(size)) < 0.45
