"""The offline datasets: fixed splits by seed, OOD sets, validation split, clear errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ngrl.bayes.datasets import DATASETS, _mnist1d_arrays, load


@pytest.mark.parametrize("name", sorted(set(DATASETS) - {"mnist1d"}))
def test_split_is_fixed_by_seed(name: str) -> None:
    first, again, other = load(name, 0), load(name, 0), load(name, 1)
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_test, again.y_test)
    assert not torch.equal(first.x_train, other.x_train)
    assert first.x_train.dtype == torch.float32 and first.x_train.ndim == 2
    assert len(first.x_train) == len(first.y_train) and len(first.x_test) == len(first.y_test)
    assert first.ood and all(x.shape[1] == first.input_dim for x in first.ood.values())
    if first.task == "classification":
        assert first.y_train.dtype == torch.int64
        assert set(first.y_test.tolist()) <= set(range(first.num_classes))
    else:
        assert first.y_train.dtype == torch.float32 and first.noise_variance > 0


def test_tables_are_standardised_on_the_training_split() -> None:
    data = load("breast_cancer", 3)
    np.testing.assert_allclose(data.x_train.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.x_train.std(0, correction=0), 1.0, atol=1e-4)


def test_digits_ood_pairs() -> None:
    digits = load("digits", 0)
    assert set(digits.ood) == {"rotated", "noise"}
    rotated = digits.ood["rotated"].reshape(-1, 8, 8)
    original = digits.x_test.reshape(-1, 8, 8)
    assert torch.equal(torch.rot90(original, 1, dims=(1, 2)), rotated)
    split = load("digits-0to4", 0)
    assert split.num_classes == 5 and split.y_train.max() == 4
    assert len(split.ood["digits-5to9"]) > 100


def test_mnist1d_is_generated_locally_and_leaves_numpy_alone(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the package's download path would write a pickle here
    _mnist1d_arrays.cache_clear()  # generate here, not in an earlier test
    np.random.seed(123)
    random.seed(123)
    expected = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    data = load("mnist1d")
    assert (np.random.rand(), random.random()) == expected
    assert data.x_train.shape == (4000, 40) and data.x_test.shape == (1000, 40)
    assert data.num_classes == 10 and not list(tmp_path.iterdir())
    shuffled = data.ood["shuffled"]
    # The same signals with their 40 positions permuted once for all.
    assert torch.equal(shuffled.sort(dim=1).values, data.x_test.sort(dim=1).values)
    assert not torch.equal(shuffled, data.x_test)


def test_validation_split_is_held_out_of_the_training_split() -> None:
    full = load("wine", 2)
    validation = load("wine", 2, split="validation")
    assert len(validation.x_train) + len(validation.x_test) == len(full.x_train)
    rows = {tuple(r) for r in full.x_train.tolist()}
    assert all(tuple(r) in rows for r in validation.x_test.tolist())
    assert set(validation.y_test.tolist()) == set(full.y_train.tolist())  # stratified


def test_gap_has_no_training_input_in_the_gap() -> None:
    data = load("gap", 0)
    assert data.x_train.abs().min() >= 0.35
    assert data.ood["gap"].abs().max() <= 0.3


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid names: digits, digits-0to4"):
        load("cifar10")
    with pytest.raises(ValueError, match="split"):
        load("iris", split="train")
