"""K-FAC for ``nn.RNN``, ``nn.GRU`` and ``nn.LSTM``: the step-by-step forward equals the
module's, and every dense map's statistics equal K-FAC-expand over time computed from
per-step quantities that torch's own cells give (float64)."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngrl.curvature import RecurrentChainBlock
from ngrl.fisher import layer_indices
from ngrl.layers import RecurrentLayer, find_layers
from ngrl.optim import KFAC, CurvatureFallbackWarning
from ngrl.recurrent import unroll
from tests.helpers.oracle import capture_batch, fit, sample_classes

INPUT, HIDDEN, STEPS, CLASSES = 3, 4, 5, 3
RECURRENT = {
    "rnn-tanh": lambda **kw: nn.RNN(INPUT, HIDDEN, **kw),
    "rnn-relu": lambda **kw: nn.RNN(INPUT, HIDDEN, nonlinearity="relu", **kw),
    "gru": lambda **kw: nn.GRU(INPUT, HIDDEN, **kw),
    "lstm": lambda **kw: nn.LSTM(INPUT, HIDDEN, **kw),
}
CELLS = {"rnn-tanh": nn.RNNCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell}
SHAPES = [
    dict(num_layers=1),
    dict(num_layers=2, batch_first=True),
    dict(num_layers=2, bidirectional=True, dropout=0.0),
    dict(num_layers=1, bidirectional=True, batch_first=True, bias=False),
]


def initial_state(kind: str, module: nn.RNNBase, batch: int | None) -> object:
    layers = module.num_layers * (2 if module.bidirectional else 1)
    shape = (layers, HIDDEN) if batch is None else (layers, batch, HIDDEN)
    h = torch.randn(shape)
    return (h, torch.randn(shape)) if kind == "lstm" else h


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("kind", RECURRENT)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("with_state", [False, True])
def test_the_step_by_step_forward_and_its_gradients_are_the_modules(
    kind: str, shape: dict, with_state: bool
) -> None:
    module = RECURRENT[kind](**shape)
    batch_first = shape.get("batch_first", False)
    x = torch.randn((6, STEPS, INPUT) if batch_first else (STEPS, 6, INPUT), requires_grad=True)
    hx = initial_state(kind, module, 6) if with_state else None
    expected, expected_state = module(x, hx)
    (output, state), maps = unroll(module, x, hx)
    torch.testing.assert_close(output, expected)
    for got, want in zip(
        state if kind == "lstm" else (state,),
        expected_state if kind == "lstm" else (expected_state,),
        strict=True,
    ):
        torch.testing.assert_close(got, want)
    directions = 2 if module.bidirectional else 1
    assert len(maps) == 2 * module.num_layers * directions
    weights = list(module.parameters())
    want_grads = torch.autograd.grad(expected.square().sum(), [x, *weights])
    got_grads = torch.autograd.grad(output.square().sum(), [x, *weights])
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("kind", RECURRENT)
def test_an_unbatched_sequence_gives_the_modules_output(kind: str) -> None:
    module = RECURRENT[kind](num_layers=2, bidirectional=True)
    x = torch.randn(STEPS, INPUT)
    hx = initial_state(kind, module, None)
    expected, _ = module(x, hx)
    (output, _), _ = unroll(module, x, hx)
    torch.testing.assert_close(output, expected)


def test_each_layer_and_direction_has_an_input_map_and_a_hidden_map() -> None:
    model = nn.LSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True)
    layers = find_layers(model)
    assert [layer.name for layer in layers] == [
        f"{part}_l{k}{reverse}"
        for k, reverse, part in itertools.product((0, 1), ("", "_reverse"), ("ih", "hh"))
    ]
    assert all(isinstance(layer, RecurrentLayer) for layer in layers)
    first_input, second_input = layers[0], layers[4]
    assert first_input.shape == (4 * HIDDEN, INPUT + 1)
    assert second_input.shape == (4 * HIDDEN, 2 * HIDDEN + 1)
    assert layers[1].shape == (4 * HIDDEN, HIDDEN + 1)
    params = [p.detach() for p in first_input.params]
    for part, param in zip(first_input.scatter(first_input.gather(params)), params, strict=True):
        torch.testing.assert_close(part, param)


class SequenceClassifier(nn.Module):
    """A one-layer recurrent module on ``(N, T, d)`` sequences, all its outputs read by a
    dense head."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.rnn = RECURRENT[kind](batch_first=True)
        self.head = nn.Linear(STEPS * HIDDEN, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0].flatten(1))


def per_step_statistics(model: SequenceClassifier, kind: str, x: Tensor, targets: Tensor):  # noqa: ANN201
    """Per example and step, the inputs of the two maps and the gradients of the loss with
    respect to their outputs, from torch's own cell with one bias copy per step."""
    cell = CELLS[kind](INPUT, HIDDEN)
    rnn = model.rnn
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    cell.load_state_dict({name: getattr(rnn, f"{name}_l0") for name in names})
    inputs_ih, inputs_hh, grads_ih, grads_hh = [], [], [], []
    for x_n, y_n in zip(x, targets, strict=True):
        bias_ih = rnn.bias_ih_l0.detach().repeat(STEPS, 1).requires_grad_()
        bias_hh = rnn.bias_hh_l0.detach().repeat(STEPS, 1).requires_grad_()
        h = torch.zeros(1, HIDDEN)
        state: object = (h, torch.zeros(1, HIDDEN)) if kind == "lstm" else h
        previous, outputs = [], []
        for t in range(STEPS):
            previous.append(h[0].detach())
            params = {
                "weight_ih": rnn.weight_ih_l0,
                "weight_hh": rnn.weight_hh_l0,
                "bias_ih": bias_ih[t],
                "bias_hh": bias_hh[t],
            }
            state = torch.func.functional_call(cell, params, (x_n[t][None], state))
            h = state[0] if kind == "lstm" else state
            outputs.append(h)
        loss = F.cross_entropy(model.head(torch.cat(outputs, 1)), y_n[None])
        g_ih, g_hh = torch.autograd.grad(loss, [bias_ih, bias_hh])
        inputs_ih.append(x_n)
        inputs_hh.append(torch.stack(previous))
        grads_ih.append(g_ih)
        grads_hh.append(g_hh)
    return {
        "ih": (torch.stack(inputs_ih), torch.stack(grads_ih)),
        "hh": (torch.stack(inputs_hh), torch.stack(grads_hh)),
    }


def captured_classifier(kind: str, **kfac: object) -> tuple[KFAC, dict[str, tuple[Tensor, Tensor]]]:
    """K-FAC on a :class:`SequenceClassifier` after one captured batch, and the batch's
    per-step statistics (:func:`per_step_statistics`)."""
    model = SequenceClassifier(kind)
    x = torch.randn(6, STEPS, INPUT)
    targets = sample_classes(model(x))
    opt = KFAC(model, **kfac)  # type: ignore[arg-type]
    capture_batch(opt, model, x, targets)
    return opt, per_step_statistics(model, kind, x, targets)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("kind", CELLS)
def test_the_factors_are_kfac_expand_over_time_from_per_step_quantities(kind: str) -> None:
    opt, statistics = captured_classifier(kind)
    for part, (a, g) in statistics.items():
        n = a.shape[0]
        a = torch.cat([a, torch.ones(n, STEPS, 1)], 2)
        block = opt.blocks[f"rnn.{part}_l0"]
        a_factor = torch.einsum("nti,ntj->ij", a, a) / n
        g_factor = torch.einsum("nti,ntj->ij", g, g) / (n * STEPS)
        torch.testing.assert_close(block.a_factor, a_factor, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(block.g_factor, g_factor, rtol=1e-10, atol=1e-12)


def exact_block(model: nn.Module, x: Tensor, targets: Tensor, layer: str) -> Tensor:
    """``E_n[∇ℓ_n ∇ℓ_nᵀ]`` of one layer, one example at a time, on a copy of the model
    without K-FAC's hooks."""
    plain = copy.deepcopy(model)
    plain._forward_hooks.clear()
    for module in plain.modules():
        module._forward_hooks.clear()
    params = [p for p in plain.parameters() if p.requires_grad]
    index = layer_indices(plain, layer)
    rows = []
    for x_n, y_n in zip(x, targets, strict=True):
        grads = torch.autograd.grad(F.cross_entropy(plain(x_n[None]), y_n[None]), params)
        rows.append(torch.cat([g.flatten() for g in grads])[index])
    stacked = torch.stack(rows)
    return stacked.T @ stacked / len(rows)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("kind", RECURRENT)
def test_one_step_and_a_shared_input_give_the_exact_fisher_block(kind: str) -> None:
    model = nn.Sequential(RECURRENT[kind](batch_first=True), Last(), nn.Linear(HIDDEN, CLASSES))
    x = torch.randn(1, 1, INPUT).expand(7, 1, INPUT).contiguous()
    targets = sample_classes(model(x))
    opt = KFAC(model)
    capture_batch(opt, model, x, targets)
    for part in ("ih", "hh"):
        name = f"0.{part}_l0"
        torch.testing.assert_close(
            opt.blocks[name].to_dense(), exact_block(model, x, targets, name), rtol=1e-9, atol=1e-12
        )


class Last(nn.Module):
    """The output of the last step of a recurrent module's ``(output, state)``."""

    def forward(self, output: tuple[Tensor, object]) -> Tensor:
        return output[0][:, -1]


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("kind", ["gru", "lstm", "lstm-proj"])
def test_a_recurrent_classifier_trains_with_kfac_and_no_fallback(kind: str) -> None:
    torch.manual_seed(0)
    model = ProjectedClassifier() if kind == "lstm-proj" else SequenceClassifier(kind)
    x = torch.randn(128, STEPS, INPUT)
    labels = (x[:, 0, 0] > 0).long() + (x[:, 0, 1] > 0).long()  # needs the first step
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvatureFallbackWarning)
        opt = KFAC(model, lr=0.2)
    assert opt.fallbacks == {}
    start, end = fit(opt, model, x, labels, steps=40)
    assert end < 0.5 * start


# --- the chain of correlated steps (recurrent="chain") -----------------------------------
def lag_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """``E_{n,t}[x_t x_tᵀ]`` and the symmetrised ``E_{n,t}[x_t x_{t+1}ᵀ]``."""
    n, steps = x.shape[0], x.shape[1]
    lag0 = torch.einsum("nti,ntj->ij", x, x) / (n * steps)
    lag1 = torch.einsum("nti,ntj->ij", x[:, :-1], x[:, 1:]) / (n * (steps - 1))
    return lag0, 0.5 * (lag1 + lag1.T)


def matrix_power(matrix: Tensor, power: float) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.pow(power)) @ vectors.T


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("kind", CELLS)
def test_the_chain_block_sums_the_modelled_moments_over_every_pair_of_steps(kind: str) -> None:
    opt, statistics = captured_classifier(kind, recurrent="chain")
    damping = 0.1
    for part, (a, g) in statistics.items():
        a = torch.cat([a, torch.ones(a.shape[0], STEPS, 1)], 2)
        block = opt.blocks[f"rnn.{part}_l0"]
        assert isinstance(block, RecurrentChainBlock)
        (a0, a1), (g0, g1) = lag_moments(a), lag_moments(g)
        assert block.a_moments is not None and block.g_moments is not None
        torch.testing.assert_close(block.a_moments, torch.stack([a0, a1]))
        torch.testing.assert_close(block.g_moments, torch.stack([g0, g1]))
        # The model written out: factored damping λ/T split by the traces, whitened
        # transitions, and E[w_t w_sᵀ] = C₀^{½} Ψ^{|t−s|} C₀^{½} summed over all pairs.
        pi = ((a0.trace() / a0.shape[0]) / (g0.trace() / g0.shape[0])).sqrt()
        root = (damping / STEPS) ** 0.5
        a0 = a0 + pi * root * torch.eye(a0.shape[0])
        g0 = g0 + root / pi * torch.eye(g0.shape[0])
        psi = torch.kron(
            matrix_power(g0, -0.5) @ g1 @ matrix_power(g0, -0.5),
            matrix_power(a0, -0.5) @ a1 @ matrix_power(a0, -0.5),
        )
        c_root = torch.kron(matrix_power(g0, 0.5), matrix_power(a0, 0.5))
        fisher = sum(
            c_root @ torch.linalg.matrix_power(psi, abs(t - s)) @ c_root
            for t in range(STEPS)
            for s in range(STEPS)
        )
        block.refresh(damping)
        torch.testing.assert_close(block.damped_dense(damping), fisher, rtol=1e-8, atol=1e-10)
        grad = torch.randn(block.shape)
        expected = torch.linalg.solve(fisher, grad.reshape(-1)).reshape(block.shape)
        torch.testing.assert_close(
            block.precondition(grad, damping), expected, rtol=1e-7, atol=1e-9
        )


@pytest.mark.usefixtures("float64")
def test_a_chain_of_one_step_is_kfac_with_factored_damping() -> None:
    model = nn.Sequential(RECURRENT["lstm"](batch_first=True), Last(), nn.Linear(HIDDEN, 2))
    x = torch.randn(9, 1, INPUT)
    targets = sample_classes(model(x))
    chain = KFAC(model, recurrent="chain")
    reference = KFAC(model, curvature_options={"damping_rule": "factored"})
    capture_batch(chain, model, x, targets)
    capture_batch(reference, model, x, targets)
    for name in ("0.ih_l0", "0.hh_l0"):
        grad = torch.randn(chain.blocks[name].shape)
        torch.testing.assert_close(
            chain.blocks[name].precondition(grad, 0.1),
            reference.blocks[name].precondition(grad, 0.1),
        )


def test_the_chain_trains_and_its_checkpoint_round_trips() -> None:
    torch.manual_seed(0)
    model = SequenceClassifier("lstm")
    x = torch.randn(128, STEPS, INPUT)
    labels = (x[:, 0, 0] > 0).long() + (x[:, 0, 1] > 0).long()
    opt = KFAC(model, lr=0.2, recurrent="chain")
    start, end = fit(opt, model, x, labels, steps=40)
    assert end < 0.5 * start
    restored = KFAC(model, recurrent="chain")
    restored.load_state_dict(opt.state_dict())
    for name, block in opt.blocks.items():
        torch.testing.assert_close(restored.blocks[name].to_dense(), block.to_dense())


class EveryLayer(nn.Module):
    """One of every layer type with a K-FAC block: an embedding, 1-, 2- and 3-D
    convolutions, 1- and 2-D transposed convolutions, group, layer and batch norms, an
    RNN, a GRU, multi-head attention and a bidirectional LSTM, dense layers."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.group_norm = nn.GroupNorm(2, 6)
        self.deconv = nn.ConvTranspose1d(6, 4, 3, padding=1)
        self.conv2d = nn.Conv2d(4, 4, (3, 1), padding=(1, 0))
        self.deconv2d = nn.ConvTranspose2d(4, 4, (3, 1), padding=(1, 0))
        self.conv3d = nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0))
        self.batch_norm = nn.BatchNorm1d(4)
        self.rnn = nn.RNN(4, 5, batch_first=True)
        self.gru = nn.GRU(5, 5, batch_first=True)
        self.attention = nn.MultiheadAttention(5, 1, batch_first=True)
        self.lstm = nn.LSTM(5, 5, batch_first=True, bidirectional=True)
        self.layer_norm = nn.LayerNorm(10)
        self.head = nn.Linear(10, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embedding(tokens).transpose(1, 2)  # (N, 4, T)
        x = self.deconv(torch.tanh(self.group_norm(self.conv(x))))
        x = self.deconv2d(torch.tanh(self.conv2d(x[..., None])))  # (N, 4, T, 1)
        x = self.batch_norm(self.conv3d(x[..., None])[..., 0, 0])
        x, _ = self.rnn(x.transpose(1, 2))
        x, _ = self.gru(x)
        x = x + self.attention(x, x, x, need_weights=False)[0]
        x, _ = self.lstm(x)
        return self.head(self.layer_norm(x[:, -1]))


def test_a_model_with_every_layer_type_trains_without_a_fallback() -> None:
    torch.manual_seed(0)
    model = EveryLayer()
    tokens = torch.randint(10, (96, 6))
    labels = tokens[:, 0] % 3  # the first token, read through every layer
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvatureFallbackWarning)
        opt = KFAC(model, lr=0.1)
    assert opt.fallbacks == {}
    # one per layer; two per RNN, GRU and attention, four per bidirectional LSTM
    assert len(opt.blocks) == 10 + 2 + 2 + 2 + 4
    start, end = fit(opt, model, tokens, labels, steps=40)
    assert end < 0.5 * start


# --- an LSTM with a projection (proj_size): a third map per layer and direction ----------
PROJ = 2


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
    "shape",
    [dict(num_layers=2, bidirectional=True), dict(num_layers=1, batch_first=True)],
    ids=["2-layers-bidirectional", "batch-first"],
)
@pytest.mark.parametrize("with_state", [False, True])
def test_a_projected_lstm_unrolls_to_the_modules_output_and_gradients(
    shape: dict, with_state: bool
) -> None:
    module = nn.LSTM(INPUT, HIDDEN, proj_size=PROJ, **shape)
    states = module.num_layers * (2 if module.bidirectional else 1)
    x = torch.randn((6, STEPS, INPUT) if shape.get("batch_first") else (STEPS, 6, INPUT))
    hx = (torch.randn(states, 6, PROJ), torch.randn(states, 6, HIDDEN)) if with_state else None
    expected, (h, c) = module(x, hx)
    (output, (h_got, c_got)), maps = unroll(module, x, hx)
    for got, want in ((output, expected), (h_got, h), (c_got, c)):
        torch.testing.assert_close(got, want)
    assert [entry.part for entry in maps] == ["ih", "hh", "hr"] * states
    weights = list(module.parameters())
    want_grads = torch.autograd.grad(expected.square().sum(), weights)
    got_grads = torch.autograd.grad(output.square().sum(), weights)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_a_projected_lstm_has_a_projection_map_without_bias() -> None:
    layers = find_layers(nn.LSTM(INPUT, HIDDEN, proj_size=PROJ, num_layers=2))
    assert [layer.name for layer in layers] == [
        f"{part}_l{k}" for k in (0, 1) for part in ("ih", "hh", "hr")
    ]
    shapes = {layer.name: layer.shape for layer in layers}
    assert shapes["hh_l0"] == (4 * HIDDEN, PROJ + 1)
    assert shapes["hr_l0"] == (PROJ, HIDDEN)
    assert shapes["ih_l1"] == (4 * HIDDEN, PROJ + 1)


class ProjectedClassifier(nn.Module):
    """A projected LSTM on ``(N, T, d)`` sequences, all its outputs read by a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(INPUT, HIDDEN, proj_size=PROJ, batch_first=True)
        self.head = nn.Linear(STEPS * PROJ, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0].flatten(1))


@pytest.mark.usefixtures("float64")
def test_the_projection_factors_are_kfac_expand_over_time_from_per_step_quantities() -> None:
    """The LSTM's equations written out per example, a zero added to every step's
    projected output: its gradient is that step's output gradient of ``W_hr``."""
    model = ProjectedClassifier()
    x = torch.randn(6, STEPS, INPUT)
    targets = sample_classes(model(x))
    opt = KFAC(model)
    capture_batch(opt, model, x, targets)
    rnn = model.rnn
    inputs, grads = [], []
    for x_n, y_n in zip(x, targets, strict=True):
        zeros = torch.zeros(STEPS, PROJ, requires_grad=True)
        h, c = torch.zeros(PROJ), torch.zeros(HIDDEN)
        raw, outputs = [], []
        for t in range(STEPS):
            gates = (
                rnn.weight_ih_l0 @ x_n[t] + rnn.bias_ih_l0 + rnn.weight_hh_l0 @ h + rnn.bias_hh_l0
            )
            i, f, g, o = gates.chunk(4)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            r = torch.sigmoid(o) * torch.tanh(c)
            raw.append(r.detach())
            h = rnn.weight_hr_l0 @ r + zeros[t]
            outputs.append(h)
        loss = F.cross_entropy(model.head(torch.cat(outputs))[None], y_n[None])
        grads.append(torch.autograd.grad(loss, zeros)[0])
        inputs.append(torch.stack(raw))
    a, g = torch.stack(inputs), torch.stack(grads)
    n = a.shape[0]
    block = opt.blocks["rnn.hr_l0"]
    torch.testing.assert_close(block.a_factor, torch.einsum("nti,ntj->ij", a, a) / n)
    torch.testing.assert_close(block.g_factor, torch.einsum("nti,ntj->ij", g, g) / (n * STEPS))


@pytest.mark.usefixtures("float64")
def test_one_step_of_a_projected_lstm_gives_the_exact_fisher_blocks() -> None:
    lstm = nn.LSTM(INPUT, HIDDEN, proj_size=PROJ, batch_first=True)
    model = nn.Sequential(lstm, Last(), nn.Linear(PROJ, CLASSES))
    x = torch.randn(1, 1, INPUT).expand(7, 1, INPUT).contiguous()
    targets = sample_classes(model(x))
    opt = KFAC(model)
    capture_batch(opt, model, x, targets)
    for part in ("ih", "hh", "hr"):
        name = f"0.{part}_l0"
        torch.testing.assert_close(
            opt.blocks[name].to_dense(), exact_block(model, x, targets, name), rtol=1e-9, atol=1e-12
        )


def test_a_packed_sequence_is_reported_once_and_its_maps_take_plain_steps() -> None:
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(0)
    model = nn.ModuleDict(
        dict(lstm=nn.LSTM(INPUT, HIDDEN, batch_first=True), head=nn.Linear(HIDDEN, 2))
    )
    opt = KFAC(model)
    packed = pack_padded_sequence(torch.randn(5, STEPS, INPUT), [5, 4, 3, 2, 1], batch_first=True)
    with pytest.warns(RuntimeWarning, match="PackedSequence: the maps of 'lstm'"):
        with opt.capture():
            _, (h, _) = model["lstm"](packed)
            F.cross_entropy(model["head"](h[-1]), torch.zeros(5, dtype=torch.long)).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model["lstm"](packed)  # reported once
    assert not opt.blocks["lstm.ih_l0"].initialized and opt.blocks["head"].initialized


def test_passes_without_statistics_keep_the_fused_kernel_and_the_gradients() -> None:
    torch.manual_seed(0)
    model = SequenceClassifier("lstm")
    x = torch.randn(6, STEPS, INPUT)
    targets = sample_classes(model(x))
    opt = KFAC(model)
    with opt.no_statistics():
        paused = F.cross_entropy(model(x), targets)
        with opt.capture():
            paused.backward()
    assert not any(block.initialized for block in opt.blocks.values())
    fused = [p.grad.clone() for p in model.parameters()]
    opt.zero_grad()
    capture_batch(opt, model, x, targets)  # the same pass with statistics
    assert all(block.initialized for block in opt.blocks.values())
    with opt.capture():
        F.cross_entropy(model(x), targets).backward()
    for got, want in zip((p.grad for p in model.parameters()), fused, strict=True):
        torch.testing.assert_close(got, want)
