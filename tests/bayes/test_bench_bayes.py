"""scripts/bench_bayes.py on a tiny budget: every optimizer and floor runs and is reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.scripts import load_script


def test_a_tiny_run_times_every_optimizer_and_floor(tmp_path: Path) -> None:
    script = load_script("bench_bayes")
    out = tmp_path / "bench.json"
    argv = ["--models", "cnn", "--batch-sizes", "4,8", "--steps", "1", "--repeats", "1"]
    script.main([*argv, "--warmup", "0", "--rank", "2", "--out", str(out)])
    results = json.loads(out.read_text())
    labels = {r["optimizer"] for r in results}
    assert {"Adam", "VOGN", "NoisyKFAC", "noisy EK-FAC", "SLANG (L=2)", "NoisyAdam"} <= labels
    assert {
        "floor: Adam + noisy K-FAC's products",
        "floor: Adam + SLANG's products (L=2)",
        "floor: Adam + VOGN's per-example squares",
    } <= labels
    assert {r["batch"] for r in results} == {4, 8}
    cnn = next(r for r in results if r["batch"] == 8)
    # Two 3x3 convolutions (1->16, 16->32, with bias) and the 1568->10 dense layer.
    shapes = [(16, 10), (32, 145), (10, 1569)]
    assert cnn["floor_multiply_adds"]["SLANG products"] == sum(2 * 2 * 8 * o * i for o, i in shapes)
    # The convolutions' per-example gradients at each output pixel: 28x28, then 14x14.
    positions = [28 * 28, 14 * 14, 1]
    squares = sum(8 * t * o * i for t, (o, i) in zip(positions, shapes, strict=True))
    assert cnn["floor_multiply_adds"]["VOGN per-example squares"] == squares
    assert all(r["ms_per_step"] > 0 for r in results)


def test_optimizers_are_chosen_by_key_with_adam_first(tmp_path: Path) -> None:
    script = load_script("bench_bayes")
    out = tmp_path / "bench.json"
    argv = ["--models", "mlp", "--batch-sizes", "4", "--steps", "1", "--repeats", "1"]
    script.main([*argv, "--warmup", "0", "--optimizers", "floor-vogn,vogn", "--out", str(out)])
    labels = [r["optimizer"] for r in json.loads(out.read_text())]
    assert labels == ["Adam", "floor: Adam + VOGN's per-example squares", "VOGN"]


def test_an_unknown_optimizer_is_refused_with_the_valid_keys(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        load_script("bench_bayes").main(["--optimizers", "vgn"])
    error = capsys.readouterr().err
    assert "unknown optimizer(s) vgn" in error and "floor-vogn" in error
