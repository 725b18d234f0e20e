"""Datasets for the calibration evaluation, all available without a download.

scikit-learn's bundled tables (``digits``, ``breast_cancer``, ``wine``, ``iris``,
``diabetes``), MNIST-1D generated locally by the ``mnist1d`` package (Greydanus 2020;
never its download path), and a 1-D regression with a gap between two clusters of inputs
(the "in-between" uncertainty test of Foong et al. 2019).

Every dataset comes with its out-of-distribution (OOD) inputs:

* ``digits``: the test digits rotated by 90°, and uniform-noise images;
* ``digits-0to4``: trained and tested on the digits 0–4; OOD are the digits 5–9;
* ``mnist1d``: the shuffled variant (one fixed permutation of the 40 positions);
* the other tables: the test rows with each feature permuted independently across rows
  (the marginals are kept, the joint structure is destroyed);
* ``gap``: inputs inside the gap.

Splits are fixed by ``seed``: the same seed gives the same split on every machine.
Features are standardised with the training split's statistics (digits pixels are
divided by 16 instead, so that rotation and noise stay on the same scale); regression
targets are standardised too. MNIST-1D keeps its own 4,000/1,000 split (generation seed
42, the published dataset); its ``seed`` changes nothing but the caller's initialisation.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from sklearn import datasets as sk
from sklearn.linear_model import Ridge
from sklearn.model_selection import train_test_split
from torch import Tensor

__all__ = ["DATASETS", "SPLITS", "Dataset", "load"]

Task = Literal["classification", "regression"]
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Dataset:
    """A train/test split with its OOD inputs.

    ``y`` holds class indices (int64) for classification and standardised targets
    (float32, shape ``(N,)``) for regression. ``noise_variance`` is the regression
    likelihood's (in standardised units; 0 for classification).
    """

    name: str
    task: Task
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int = 0
    ood: dict[str, Tensor] = field(default_factory=dict)
    noise_variance: float = 0.0

    @property
    def input_dim(self) -> int:
        return self.x_train.shape[1]

    @property
    def output_dim(self) -> int:
        return self.num_classes if self.task == "classification" else 1


def _tensors(*arrays: np.ndarray) -> list[Tensor]:
    return [torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32) for a in arrays]


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 0, std, 1.0)
    return [(a - mean) / std for a in (train, *others)]


def _permute_features(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.stack([column[rng.permutation(len(column))] for column in x.T], axis=1)


def _classification_table(name: str, x: np.ndarray, y: np.ndarray, seed: int) -> Dataset:
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=seed, stratify=y
    )
    x_train, x_test = _standardise(x_train, x_test)
    ood = _permute_features(x_test, np.random.default_rng(seed))
    xs = _tensors(x_train, x_test, ood)
    return Dataset(
        name,
        "classification",
        xs[0],
        torch.as_tensor(y_train, dtype=torch.int64),
        xs[1],
        torch.as_tensor(y_test, dtype=torch.int64),
        num_classes=int(y.max()) + 1,
        ood={"permuted-features": xs[2]},
    )


def _digits_split(seed: int, classes: range) -> tuple[np.ndarray, ...]:
    data = sk.load_digits()
    keep = np.isin(data.target, classes)
    x, y = data.data[keep] / 16.0, data.target[keep]
    return tuple(train_test_split(x, y, test_size=TEST_FRACTION, random_state=seed, stratify=y))


def _rotate(images: np.ndarray) -> np.ndarray:
    return np.rot90(images.reshape(-1, 8, 8), k=1, axes=(1, 2)).reshape(-1, 64)


def digits(seed: int) -> Dataset:
    x_train, x_test, y_train, y_test = _digits_split(seed, range(10))
    noise = np.random.default_rng(seed).uniform(0.0, 1.0, size=x_test.shape)
    xs = _tensors(x_train, x_test, _rotate(x_test), noise)
    return Dataset(
        "digits",
        "classification",
        xs[0],
        torch.as_tensor(y_train),
        xs[1],
        torch.as_tensor(y_test),
        num_classes=10,
        ood={"rotated": xs[2], "noise": xs[3]},
    )


def digits_0to4(seed: int) -> Dataset:
    x_train, x_test, y_train, y_test = _digits_split(seed, range(5))
    unseen = _digits_split(seed, range(5, 10))[1]  # the test split of the digits 5–9
    xs = _tensors(x_train, x_test, unseen)
    return Dataset(
        "digits-0to4",
        "classification",
        xs[0],
        torch.as_tensor(y_train),
        xs[1],
        torch.as_tensor(y_test),
        num_classes=5,
        ood={"digits-5to9": xs[2]},
    )


def _table(loader: Callable[[], Any], name: str) -> Callable[[int], Dataset]:
    def load_table(seed: int) -> Dataset:
        data = loader()
        return _classification_table(name, data.data, data.target, seed)

    load_table.__doc__ = f"scikit-learn's bundled ``{name}`` table, stratified 80/20 split."
    return load_table


@functools.cache
def _mnist1d_arrays() -> dict[str, np.ndarray]:
    """The published MNIST-1D, generated once per process (seconds; it ignores the seed)."""
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset seeds the global generators of NumPy and of `random`; keep the caller's
    # streams untouched.
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        return make_dataset(get_dataset_args())
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def mnist1d(seed: int) -> Dataset:
    data = _mnist1d_arrays()
    permutation = np.random.default_rng(42).permutation(data["x_test"].shape[1])
    xs = _tensors(data["x"], data["x_test"], data["x_test"][:, permutation])
    return Dataset(
        "mnist1d",
        "classification",
        xs[0],
        torch.tensor(data["y"], dtype=torch.int64),  # copies: the arrays are cached
        xs[1],
        torch.tensor(data["y_test"], dtype=torch.int64),
        num_classes=10,
        ood={"shuffled": xs[2]},
    )


def diabetes(seed: int) -> Dataset:
    """scikit-learn's ``diabetes`` (442 × 10), 80/20; the noise variance is the training
    residual variance of a ridge regression (standardised units)."""
    data = sk.load_diabetes()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=TEST_FRACTION, random_state=seed
    )
    x_train, x_test = _standardise(x_train, x_test)
    y_train, y_test = _standardise(y_train, y_test)
    residual = y_train - Ridge(alpha=1.0).fit(x_train, y_train).predict(x_train)
    ood = _permute_features(x_test, np.random.default_rng(seed))
    x_train, x_test, ood, y_train, y_test = _tensors(x_train, x_test, ood, y_train, y_test)
    return Dataset(
        "diabetes",
        "regression",
        x_train,
        y_train,
        x_test,
        y_test,
        ood={"permuted-features": ood},
        noise_variance=float(residual.var()),
    )


GAP_NOISE_STD = 0.1


def gap(seed: int) -> Dataset:
    """``y = sin(3x) + ε``, ``ε ~ N(0, 0.1²)``, with inputs in two clusters
    ``[−1, −0.35] ∪ [0.35, 1]``: 160 training and 40 test points; OOD is the gap
    ``(−0.3, 0.3)``."""
    rng = np.random.default_rng(seed)
    n = 200
    x = rng.uniform(0.35, 1.0, size=n) * rng.choice([-1.0, 1.0], size=n)
    y = np.sin(3 * x) + GAP_NOISE_STD * rng.normal(size=n)
    inside = np.linspace(-0.3, 0.3, 50)
    x_train, x_test, y_train, y_test, inside = _tensors(
        x[:160, None], x[160:, None], y[:160], y[160:], inside[:, None]
    )
    return Dataset(
        "gap",
        "regression",
        x_train,
        y_train,
        x_test,
        y_test,
        ood={"gap": inside},
        noise_variance=GAP_NOISE_STD**2,
    )


DATASETS: dict[str, Callable[[int], Dataset]] = {
    "digits": digits,
    "digits-0to4": digits_0to4,
    "breast_cancer": _table(sk.load_breast_cancer, "breast_cancer"),
    "wine": _table(sk.load_wine, "wine"),
    "iris": _table(sk.load_iris, "iris"),
    "mnist1d": mnist1d,
    "diabetes": diabetes,
    "gap": gap,
}


SPLITS = ("test", "validation")


def load(name: str, seed: int = 0, split: str = "test") -> Dataset:
    """The dataset ``name`` with the split of ``seed``.

    ``split="validation"`` is for choosing hyperparameters without looking at the test
    set: the training split is split again (80/20, stratified for classification, same
    seed) and the held-out part takes the place of the test split. The OOD inputs and the
    feature standardisation stay those of the full training split.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"Invalid split value: {split!r}; valid: {', '.join(SPLITS)}")
    data = DATASETS[name](seed)
    if split == "test":
        return data
    classes = data.y_train.numpy() if data.task == "classification" else None
    x_train, x_val, y_train, y_val = train_test_split(
        data.x_train, data.y_train, test_size=TEST_FRACTION, random_state=seed, stratify=classes
    )
    return replace(data, x_train=x_train, y_train=y_train, x_test=x_val, y_test=y_val)
