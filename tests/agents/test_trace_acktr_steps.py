"""scripts/trace_acktr_steps.py: per-update trust-region trace, and its bad input."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from tests.helpers.scripts import load_script


def test_the_trace_records_every_kfac_update(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_script("trace_acktr_steps")
    out = tmp_path / "trace.csv"
    assert (
        script.main(
            [
                "--env",
                "CartPole",
                "--updates",
                "14",
                "--window",
                "5",
                "--set",
                "n_steps=8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| updates | ν | predicted KL | measured policy KL")
    rows = list(csv.DictReader(out.open()))
    assert [int(r["update"]) for r in rows] == list(range(11, 15))  # after 10 cold-start updates
    for row in rows:
        shares = [float(v) for k, v in row.items() if k.startswith("quadratic:")]
        nu = float(row["nu"])
        assert 0.0 < nu <= 1.0 and all(q >= 0.0 for q in shares)
        assert float(row["predicted_kl"]) <= 1e-3 * (1 + 1e-9)  # the preset's kl_clip
        assert float(row["policy_kl"]) >= 0.0 and math.isfinite(float(row["value_rms_change"]))


def test_each_step_is_measured_against_the_gradients_at_its_kl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The probes move the policy by the step's own measured KL; without momentum the step
    is the K-FAC-preconditioned gradient of its loss, so the two spend their KL alike."""
    script = load_script("trace_acktr_steps")
    out = tmp_path / "trace.csv"
    argv = ["--env", "CartPole", "--updates", "16", "--window", "3", "--out", str(out)]
    settings = ["n_steps=8", "momentum=0.0", "learning_rate=0.5"]
    assert script.main([*argv, *(a for s in settings for a in ("--set", s))]) == 0
    assert "| the K-FAC gradient's | the K-FAC loss gradient's |" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6
    for row in rows:
        kl = float(row["policy_kl"])
        assert kl > 0.0
        for probe in ("gradient", "kfac_gradient", "kfac_loss_gradient"):
            assert float(row[f"{probe}_kl"]) == pytest.approx(kl, rel=0.05)
            assert float(row[f"{probe}_efficiency"]) == pytest.approx(
                float(row[f"{probe}_gain"]) / math.sqrt(2 * float(row[f"{probe}_kl"]))
            )
        assert float(row["gradient_gain"]) > 0.0  # uphill, at a small step
        assert float(row["efficiency"]) == pytest.approx(
            float(row["kfac_loss_gradient_efficiency"]), rel=0.05
        )


def test_the_natural_gradient_spends_the_steps_kl_better_than_the_gradient(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Conjugate gradient on the exact Fisher searches a Krylov space that holds the
    gradient, so its direction gains more per √(2 KL) than the gradient's; it is probed
    at the step's own measured KL like the others."""
    argv = ["--env", "CartPole", "--updates", "16", "--window", "3", "--natural-gradient"]
    settings = ["n_steps=8", "momentum=0.0", "learning_rate=0.5"]  # steps of measurable KL
    table, rows = traced(tmp_path, capsys, *argv, *(a for s in settings for a in ("--set", s)))
    assert "| the gradient's | the natural gradient's | the K-FAC gradient's |" in table[0]
    assert len(rows) == 6
    for row in rows:
        kl = float(row["natural_gradient_kl"])
        assert kl == pytest.approx(float(row["policy_kl"]), rel=0.05)
        assert float(row["natural_gradient_efficiency"]) == pytest.approx(
            float(row["natural_gradient_gain"]) / math.sqrt(2 * kl)
        )
        assert float(row["natural_gradient_efficiency"]) > float(row["gradient_efficiency"])


def test_held_out_probes_are_fitted_to_one_half_and_measured_on_the_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_script("trace_acktr_steps")
    argv = ["--env", "CartPole", "--updates", "14", "--window", "2", "--held-out"]
    settings = ["n_steps=8", "momentum=0.0", "learning_rate=0.5"]
    _, rows = traced(tmp_path, capsys, *argv, *(a for s in settings for a in ("--set", s)))
    _, in_sample = traced(
        tmp_path, capsys, *argv[:-1], *(a for s in settings for a in ("--set", s))
    )
    assert len(rows) == len(in_sample) == 4
    for row, whole in zip(rows, in_sample, strict=True):
        assert row["policy_kl"] == whole["policy_kl"]  # the step is the same
        for name in ("gradient", "kfac_gradient"):  # scaled to the step's KL on their half
            assert float(row[f"{name}_kl"]) == pytest.approx(float(row["policy_kl"]), rel=0.05)
            assert row[f"{name}_gain"] != whole[f"{name}_gain"]
        assert math.isnan(float(row["kfac_loss_gradient_efficiency"]))  # the whole batch's
    # rows_of cuts a categorical and a normal policy alike.
    rows_of = script.rows_of
    index = torch.tensor([0, 2])
    logits = torch.randn(4, 3)
    torch.testing.assert_close(
        rows_of(torch.distributions.Categorical(logits=logits), index).logits,
        torch.distributions.Categorical(logits=logits[index]).logits,
    )
    normal = rows_of(torch.distributions.Normal(torch.zeros(4, 2), torch.ones(4, 2)), index)
    assert normal.loc.shape == (2, 2)


def test_a_split_trust_region_is_traced_part_by_part(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_script("trace_acktr_steps")
    out = tmp_path / "trace.csv"
    args = ["--env", "CartPole", "--updates", "12", "--window", "2", "--out", str(out)]
    for setting in ("n_steps=8", "learning_rate=0.1", "trust_region=split", "value_kl_clip=1e-6"):
        args += ["--set", setting]
    assert script.main(args) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("| updates | ν_π / ν_V |")
    rows = list(csv.DictReader(out.open()))
    assert [int(r["update"]) for r in rows] == [11, 12]
    for row in rows:
        assert 0.0 < float(row["nu_value"]) < 1.0  # the tight value radius binds
        # Each part spends at most its own radius: 1e-3 (policy) + 1e-6 (value).
        assert float(row["predicted_kl"]) <= (1e-3 + 1e-6) * (1 + 1e-9)
        assert {k for k in row if k.startswith("quadratic:")} >= {
            "quadratic:action_net",
            "quadratic:value_net",
        }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--env", "CartPole", "--updates", "0"], "--updates, --window and --cg-steps must be"),
        (["--env", "CartPole", "--cg-damping", "-1"], "--cg-damping must be >= 0, not -1.0"),
        (["--env", "CartPole", "--preset", "nope"], "no preset 'nope'"),
        (["--env", "CartPole", "--set", "kl_clipp=1"], "no hyperparameter 'kl_clipp'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_script("trace_acktr_steps")
    assert script.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


class TwoKnobs(gym.Env):
    """Two independent choices per step: a MultiDiscrete action space."""

    observation_space = spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = spaces.MultiDiscrete([2, 3])

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple:
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action: np.ndarray) -> tuple:
        reward = float(action[0] == 1) + float(action[1] == 2)
        return self.observation_space.sample(), reward, False, False, {}


def test_held_out_refuses_other_action_spaces_before_training(
    capsys: pytest.CaptureFixture[str],
) -> None:
    if "ngrl-test/TwoKnobs-v0" not in gym.registry:
        gym.register("ngrl-test/TwoKnobs-v0", entry_point=TwoKnobs, max_episode_steps=20)
    script = load_script("trace_acktr_steps")
    argv = ["--env", "ngrl-test/TwoKnobs-v0", "--updates", "2", "--set", "n_steps=4"]
    assert script.main([*argv, "--held-out"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before the first update
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "--held-out takes Discrete and Box action spaces" in err[0]
    assert "MultiDiscrete([2 3])" in err[0]
    assert script.main([*argv, "--window", "1"]) == 0  # traced in-sample as before


def test_a_checkpoint_is_traced_from_its_step_with_a_changed_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ngrl.train import main as train

    folder = tmp_path / "run"
    args = ["acktr", "--env", "CartPole", "--timesteps", "256", "--n-envs", "2"]
    args += ["--no-progress", "--eval-episodes", "0", "--set", "n_steps=8"]
    assert train([*args, "--set", "cold_start_steps=1", "--log-dir", str(folder)]) == 0
    capsys.readouterr()
    script = load_script("trace_acktr_steps")
    out = tmp_path / "trace.csv"
    checkpoint = str(folder / "checkpoint.zip")
    argv = ["--env", "CartPole", "--updates", "3", "--resume", checkpoint, "--out", str(out)]
    assert script.main([*argv, "--set", "kl_clip=1e-5"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [int(r["update"]) for r in rows] == [17, 18, 19]  # 256 / (2 x 8) = 16 done
    # The changed trust region reached the restored optimizer.
    assert all(float(r["predicted_kl"]) <= 1e-5 * (1 + 1e-9) for r in rows)
    assert script.main(["--env", "Pendulum", "--resume", checkpoint]) == 2
    assert "not acktr on Pendulum" in capsys.readouterr().err
    for setting in ("n_envs=4", "kfac_kwargs.damping=0.1"):  # a run setting, a nested option
        assert script.main(["--env", "CartPole", "--resume", checkpoint, "--set", setting]) == 2
        assert "acktr's own top-level arguments only" in capsys.readouterr().err


def traced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[list[str], list[dict[str, str]]]:
    """The printed table's lines and the CSV rows of one successful trace."""
    out = tmp_path / "trace.csv"
    assert load_script("trace_acktr_steps").main([*argv, "--out", str(out)]) == 0
    return capsys.readouterr().out.splitlines(), list(csv.DictReader(out.open()))


def test_a2c_is_traced_by_its_measured_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--algo", "a2c", "--env", "CartPole", "--updates", "6", "--window", "3"]
    table, rows = traced(tmp_path, capsys, *argv)
    assert table[0].startswith("| updates | measured policy KL | mean policy KL |")
    assert [int(r["update"]) for r in rows] == list(range(1, 7))  # no cold start, no ν
    assert "nu" not in rows[0] and all(0.0 < float(r["entropy"]) <= math.log(2) for r in rows)
    assert all(float(r["policy_kl"]) > 0.0 for r in rows)
    # The KL is measured across the update: a vanishing step, a vanishing change.
    _, rows = traced(tmp_path, capsys, *argv, "--set", "learning_rate=1e-12")
    assert all(float(r["policy_kl"]) < 1e-15 for r in rows)
    assert all(float(r["value_rms_change"]) < 1e-9 for r in rows)


def test_a_gaussian_policys_log_std_is_named_in_the_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--env", "Pendulum", "--updates", "3", "--window", "3", "--set", "n_steps=8"]
    table, rows = traced(tmp_path, capsys, *argv, "--set", "n_critic_updates=2")
    assert "| log_std share |" in table[0]
    assert rows and all(float(r["quadratic:log_std"]) >= 0.0 for r in rows)
