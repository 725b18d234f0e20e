"""The README's Python example runs and trains (the README must stay true)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_example_runs_and_lowers_the_loss() -> None:
    code = re.search(r"## K-FAC in ten lines\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None, "README lost its K-FAC example"
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(code.group(1), str(README), "exec"), namespace)
    model, x, y = namespace["model"], namespace["x"], namespace["y"]
    with torch.no_grad():
        final = F.cross_entropy(model(x), y)
    assert namespace["opt"].steps == 20
    assert float(final) < 1.09  # labels are random: chance-level loss is log(3) ≈ 1.0986


def _acktr_example() -> str:
    code = re.search(
        r"## ACKTR for Stable-Baselines3 users\n\n```python\n(.*?)```", README.read_text(), re.S
    )
    assert code is not None, "README lost its ACKTR example"
    assert ".learn(100_000)" in code.group(1)
    return code.group(1)


def test_readme_acktr_example_runs(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    # Every line of the example on a budget of one update; the learning is the slow test's.
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    code = _acktr_example().replace(".learn(100_000)", ".learn(160)")
    exec(compile(code, str(README), "exec"), namespace)
    assert (tmp_path / "acktr_cartpole.zip").is_file()
    assert namespace["model"].num_timesteps == 160
    assert 8 <= namespace["mean_return"] <= 500  # CartPole's episodes last 8 to 500 steps


@pytest.mark.slow  # 100k CartPole steps (~40 s)
def test_readme_acktr_example_learns_cartpole(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_acktr_example(), str(README), "exec"), namespace)
    assert (tmp_path / "acktr_cartpole.zip").is_file()
    assert (
        namespace["mean_return"] >= 300
    )  # random: ~22; 500 is the maximum (seed spread: docs/design.md)


def test_readme_bayes_example_fits_digits() -> None:
    code = re.search(r"## Bayesian deep learning\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None, "README lost its Bayesian example"
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(code.group(1), str(README), "exec"), namespace)
    probs, y = namespace["probs"], namespace["y"]
    assert float((probs.argmax(1) == y).float().mean()) > 0.95  # training accuracy
    assert namespace["posterior"].diagonal.shape == namespace["posterior"].mean.shape
