"""scripts/diagnose_trust_region.py on a tiny CartPole ACKTR model, and its bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from ngrl.agents import ACKTR
from ngrl.envs import make_vec_env
from tests.helpers.scripts import load_script


def test_the_split_is_printed_for_a_saved_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = ACKTR("MlpPolicy", make_vec_env("CartPole", 2, seed=0), n_steps=8, seed=0)
    model.learn(8 * 2 * 15)  # past the cold start, so the K-FAC factors exist
    model.save(tmp_path / "model.zip")
    script = load_script("diagnose_trust_region")
    assert (
        script.main([str(tmp_path / "model.zip"), "--env", "CartPole", "--dampings", "1e-2,1e-4"])
        == 0
    )
    out = capsys.readouterr().out
    rows = [
        line
        for line in out.splitlines()
        if line.startswith("| 0.01 ") or line.startswith("| 0.0001 ")
    ]
    assert len(rows) == 2
    for row in rows:
        policy, value = (float(cell) for cell in row.split("|")[2:4])
        assert policy > 0.0 and value > 0.0


def test_a_missing_model_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script("diagnose_trust_region")
    assert script.main(["/nonexistent/model.zip", "--env", "CartPole"]) == 2
    assert capsys.readouterr().err.startswith("diagnose_trust_region:")
