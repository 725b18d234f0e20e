"""The optimizer fuzz (scripts/fuzz_optimizers.py): no crash and no corruption.

Every curvature and VI optimizer, small MLPs and CNNs, rank-1, zero, 1e±12-scaled and
NaN/inf inputs, batch size 1, float64 and bfloat16, extreme damping: no exception may
escape ``step()``, no parameter may become non-finite, a skipped step changes nothing.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.scripts import load_script

fuzz = load_script("fuzz_optimizers")


def assert_sound(outcomes: dict[str, int]) -> None:
    bad = {k: v for k, v in outcomes.items() if k.startswith(("crash", "corrupt"))}
    assert not bad, outcomes
    assert outcomes.get("stepped", 0) >= 1, outcomes  # the harness takes real steps


@pytest.mark.parametrize("optimizer", fuzz.OPTIMIZERS)
def test_fuzz(optimizer: str) -> None:
    assert_sound(fuzz.fuzz(optimizer, trials=12, seed=0))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", fuzz.OPTIMIZERS)
def test_fuzz_long(optimizer: str) -> None:
    assert_sound(fuzz.fuzz(optimizer, trials=300, seed=1))


def test_the_harness_sees_skips_crashes_and_corruption(monkeypatch: pytest.MonkeyPatch) -> None:
    for optimizer in fuzz.OPTIMIZERS:  # a NaN batch is skipped by every optimizer
        trial = fuzz.Trial(optimizer, "mlp", "nan", 2, torch.float32, None)
        assert fuzz.run(trial, seed=0) == "skipped", optimizer
    trial = fuzz.Trial("kfac", "mlp", "normal", 2, torch.float32, None)
    assert fuzz.run(trial, seed=0) == "stepped"

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(fuzz, "kfac_step", broken)
    assert fuzz.run(trial, seed=0) == "crash: RuntimeError"
