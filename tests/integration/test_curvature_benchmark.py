"""scripts/curvature_benchmark.py end to end on a tiny budget, and its bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers.scripts import load_script


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script("curvature_benchmark")


def test_a_tiny_run_writes_its_tables_and_figure(script: ModuleType, tmp_path: Path) -> None:
    code = script.main(
        [
            "--methods",
            "sgd,kfac,kfac-corrected",
            "--epochs",
            "2",
            "--grid-epochs",
            "1",
            "--seeds",
            "2",
            "--frobenius-epochs",
            "0",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert list(report["results"]) == ["adam", "sgd", "kfac", "kfac-corrected"]  # Adam added
    assert len(report["grid"]["kfac"]) == 16 and len(report["grid"]["adam"]) == 4
    for result in report["results"].values():
        assert len(result["runs"]) == 2
        assert len(result["runs"][0]["loss"]) == 3  # before training and after each epoch
    errors = report["frobenius"]["epoch 0"]
    assert errors["kfac-corrected"] < errors["kfac"]
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert "s to Adam's final loss" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize(
    "argv",
    [["--methods", "adam,kfca"], ["--epochs", "0"], ["--frobenius-epochs", "x"]],
)
def test_bad_input_is_one_line_and_exit_2(
    script: ModuleType, argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert script.main([*argv, "--out", str(tmp_path / "out")]) == 2
    _assert_one_line(capsys)
    assert not (tmp_path / "out").exists()


def test_an_out_that_cannot_be_a_folder_is_refused(
    script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = tmp_path / "a_file"
    taken.write_text("keep me")
    assert script.main(["--out", str(taken)]) == 2
    _assert_one_line(capsys)
    assert taken.read_text() == "keep me"


def _assert_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("curvature_benchmark:")
