"""scripts/evaluate_calibration.py end to end on a tiny budget, and its bad-input errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from ngrl.bayes import calibration
from ngrl.bayes.evaluation.methods import METHODS, Run, options_for, settings_for
from tests.helpers.scripts import SCRIPTS, load_script


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script("evaluate_calibration")


TINY = ["--set", "epochs=2", "--set", "test_samples=2", "--set", "ensemble_size=2", "--no-progress"]


def test_classification_run_writes_every_output(script, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["--dataset", "iris", "--methods", "adam,vogn", "--seeds", "2", "--out", str(out)]
    assert script.main(argv + TINY) == 0
    assert {p.name for p in out.iterdir()} == {
        "results.json",
        "results.md",
        "reliability.png",
        "entropy.png",
    }
    report = json.loads((out / "results.json").read_text())
    assert report["dataset"] == "iris" and report["seeds"] == 2
    assert report["settings"]["epochs"] == 2
    assert report["options"]["vogn"]["lr"] == options_for("iris")["vogn"]["lr"]
    expected = set(calibration.classification_metrics([[0.6, 0.4], [0.3, 0.7]], [0, 1]))
    expected.add("auroc_ood_permuted-features")
    for method in ("adam", "vogn"):
        result = report["methods"][method]
        assert set(result["metrics"]) == expected
        for stat in result["metrics"].values():
            assert set(stat) == {"mean", "std", "values"} and len(stat["values"]) == 2
        assert 0.0 <= result["metrics"]["accuracy"]["mean"] <= 1.0
        assert result["train_seconds"]["mean"] > 0 and result["diverged_seeds"] == []
    paired = report["methods"]["vogn"]["paired"]
    assert set(paired) == {"nll", "ece_15"} and "paired" not in report["methods"]["adam"]
    for metric, difference in paired.items():
        values = report["methods"]["vogn"]["metrics"][metric]["values"]
        reference = report["methods"]["adam"]["metrics"][metric]["values"]
        assert difference["seeds"] == [0, 1]
        assert difference["mean"] == pytest.approx((values[0] + values[1] - sum(reference)) / 2)
    table = (out / "results.md").read_text()
    assert "| adam |" in table and "| vogn |" in table and "ece_15" in table
    assert "Paired against adam" in table and "| vogn | " in table.split("Paired")[1]


def test_paired_difference_is_the_mean_with_its_student_t_interval(script) -> None:
    # Differences 0.5, 1.0, 2.5 (seed 3 has no reference, seed 4 a NaN): mean 4/3, sample
    # std sqrt(13/12), t(0.975, 2 dof) = 4.3027 from the t table.
    values = {0: 1.0, 1: 2.0, 2: 4.0, 3: 9.0, 4: float("nan")}
    reference = {0: 0.5, 1: 1.0, 2: 1.5, 4: 1.0}
    found = script.paired_difference(values, reference)
    half = 4.302652729911275 * (13 / 12) ** 0.5 / 3**0.5
    assert found["seeds"] == [0, 1, 2]
    assert found["mean"] == pytest.approx(4 / 3)
    assert found["low"] == pytest.approx(4 / 3 - half) and found["high"] == pytest.approx(
        4 / 3 + half
    )
    assert not found["significant"]  # the interval [-1.25, 3.92] contains 0
    shifted = script.paired_difference({0: 2.0, 1: 2.1, 2: 2.2}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert shifted["significant"] and shifted["low"] > 0


def test_regression_run_reports_coverage_and_gap_uncertainty(script, tmp_path: Path) -> None:
    out = tmp_path / "gap"
    methods = "adam,vogn,ensemble"
    argv = ["--dataset", "gap", "--methods", methods, "--seeds", "1", "--out", str(out)]
    assert script.main(argv + TINY) == 0
    results = json.loads((out / "results.json").read_text())["methods"]
    for method in methods.split(","):
        assert {
            "nll",
            "rmse",
            "coverage_50",
            "coverage_90",
            "coverage_95",
            "std_ratio_gap",
            "auroc_ood_gap",
        } == set(results[method]["metrics"])
    assert (out / "reliability.png").stat().st_size > 0


def test_ensemble_reuses_the_adam_network_as_its_first_member() -> None:
    from ngrl.bayes.datasets import load

    run = Run(load("iris"), settings_for("iris", {"epochs": 1}), seed=0)
    first = run.map_network(0)
    assert run.map_network(0) is first
    probs_adam = METHODS["adam"].train(run)(run.dataset.x_test)
    probs_again = torch.softmax(first(run.dataset.x_test), dim=-1)
    assert probs_adam.equal(probs_again)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "cifar10"], "unknown dataset 'cifar10'; valid: digits, digits-0to4"),
        (["--methods", "adam,mcdropout"], "unknown method(s) ['mcdropout']; valid: adam, sgd"),
        (["--set", "epoch=3"], "Unknown setting(s) ['epoch']"),
        (["--set", "epochs=0"], "Invalid epochs value: 0"),
        (["--set", "vogn.momentum=0.9"], "vogn has no option(s) ['momentum']; valid: lr"),
        (["--set", "bbb.lr=0.1"], "unknown method 'bbb'"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--set", "vogn.lr=-1"], "vogn: Invalid lr value: -1"),
        (["--set", "hidden=32"], "Invalid hidden value: 32"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(script, tmp_path, capsys, argv, message) -> None:
    out = tmp_path / "never"
    assert script.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_an_out_path_that_is_a_file_is_refused_before_training(script, tmp_path, capsys) -> None:
    taken = tmp_path / "results"
    taken.write_text("keep me")
    assert script.main(["--dataset", "iris", "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert f"--out {taken}" in err and err.count("\n") == 1
    assert taken.read_text() == "keep me"


def test_a_missing_peer_names_the_extra(script, tmp_path, capsys, monkeypatch) -> None:
    for name in ("ivon", "laplace"):
        missing = dataclasses.replace(METHODS[name], module="ngrl_no_such_module")
        monkeypatch.setitem(METHODS, name, missing)
        assert script.main(["--methods", f"adam,{name}", "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert f"method {name!r} needs" in err and "pip install -e '.[peers]'" in err
        assert err.count("\n") == 1


def test_readme_commands_are_valid(script) -> None:
    readme = (SCRIPTS.parent / "README.md").read_text()
    block = readme.split("### Is the confidence trustworthy?")[1].split("```")[1]
    commands = block.replace("\\\n", " ").splitlines()
    runs = [c.split()[2:] for c in commands if c.startswith("python scripts/evaluate_calibration")]
    assert len(runs) == 2
    for argv in runs:
        args = script.build_parser().parse_args(argv)
        methods = [m for m in args.methods.split(",") if METHODS[m].module is None]
        args.methods = ",".join(methods)  # the peers are an optional extra
        assert script.parse_request(args)[0] == methods
