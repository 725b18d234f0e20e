"""The methods of the calibration evaluation: train a network on a dataset, return its predictive.

Every method trains the same MLP (ReLU, the dataset's hidden sizes) from the same
initialisation on the same minibatches, for the same number of epochs, with the same
prior ``N(0, I/prior_precision)``:

* ``adam``, ``sgd``: MAP estimates; the prior enters as weight decay ``prior_precision/N``.
* ``vogn``, ``noisy-adam``, ``slang``, ``noisy-kfac``, ``noisy-ekfac`` (noisy natural
  gradient with EK-FAC, Bae et al. 2018): ngrl's VI optimizers; predictive
  by Monte Carlo over ``test_samples`` weight samples (:func:`ngrl.bayes.predict`).
* ``ivon``: IVON (Shen et al. 2024) from the ``ivon-opt`` package, with
  ``ess = N/kl_weight`` and ``weight_decay = prior_precision/N``; Monte Carlo predictive.
* ``laplace``: post-hoc last-layer K-FAC Laplace (``laplace-torch``) around the ``adam``
  MAP network of the same seed, prior precision by marginal likelihood, probit predictive
  (GLM mean and variance for regression).
* ``ensemble``: a deep ensemble of ``ensemble_size`` ``adam`` networks, initialised and
  shuffled by different seeds (the first is the ``adam`` network itself).

Classification predictives are class probabilities ``(N, K)``; regression predictives are
``(mean, variance)`` including the likelihood's noise variance. The regression loss is
the Gaussian negative log-likelihood with the dataset's fixed noise variance.

Shared settings are per dataset (:data:`SETTINGS`); method options have defaults
(:data:`METHOD_OPTIONS`) and values chosen per dataset on a validation split
(:data:`TUNED_OPTIONS`), with the grids in docs/benchmarks.md.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngrl.bayes.base import VariationalOptimizer
from ngrl.bayes.datasets import Dataset
from ngrl.bayes.hyperparams import check
from ngrl.bayes.noisy_adam import NoisyAdam
from ngrl.bayes.noisy_kfac import NoisyKFAC
from ngrl.bayes.noisy_natural_gradient import NoisyNaturalGradient
from ngrl.bayes.predict import WeightSampler, mix, sample_outputs
from ngrl.bayes.slang import SLANG
from ngrl.bayes.vogn import VOGN
from ngrl.optim.hyperparams import check_integer

__all__ = [
    "METHODS",
    "METHOD_OPTIONS",
    "SETTINGS",
    "TUNED_OPTIONS",
    "Method",
    "Run",
    "Settings",
    "options_for",
    "settings_for",
]

Prediction = Tensor | tuple[Tensor, Tensor]
Predictive = Callable[[Tensor], Prediction]


@dataclass(frozen=True)
class Settings:
    """What all methods share on one dataset."""

    epochs: int = 100
    batch_size: int = 64
    hidden: tuple[int, ...] = (64, 64)
    prior_precision: float = 1.0
    test_samples: int = 32
    ensemble_size: int = 5

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "test_samples", "ensemble_size"):
            _check_count(name, getattr(self, name))
        if not isinstance(self.hidden, tuple) or not self.hidden:
            raise ValueError(f"Invalid hidden value: {self.hidden!r} (a non-empty list of sizes)")
        for size in self.hidden:
            _check_count("hidden", size)
        check("prior_precision", self.prior_precision)


def _check_count(name: str, value: Any) -> None:
    check_integer(name, value, 1)


SETTINGS: dict[str, Settings] = {
    "mnist1d": Settings(epochs=60, hidden=(128, 128)),
    "gap": Settings(epochs=400, batch_size=32, hidden=(50, 50)),
    "iris": Settings(epochs=200, batch_size=32),
    "wine": Settings(epochs=200, batch_size=32),
}

# Each method's options where a dataset has not chosen its own.
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "adam": {"lr": 1e-3},
    "sgd": {"lr": 0.05, "momentum": 0.9},
    "vogn": {"lr": 1e-3, "kl_weight": 1.0},
    "noisy-adam": {"lr": 1e-3, "kl_weight": 1.0},
    "slang": {"lr": 1e-3, "kl_weight": 1.0, "rank": 8},
    "noisy-kfac": {"lr": 1e-3, "kl_weight": 1.0},
    "noisy-ekfac": {"lr": 1e-3, "kl_weight": 1.0, "damping": 1e-3},
    "ivon": {"lr": 0.1, "kl_weight": 1.0, "hess_init": 1.0},
    "laplace": {},
    "ensemble": {},
}

# Chosen per dataset by the lowest validation NLL (seed 0, ``--split validation``) over
# the grids recorded in docs/benchmarks.md; the test split played no part.
TUNED_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "digits": {
        "adam": {"lr": 1e-2},
        "vogn": {"lr": 1e-2, "kl_weight": 0.1},
        "noisy-adam": {"lr": 1e-2, "kl_weight": 0.01},
        "slang": {"lr": 1e-2, "kl_weight": 0.3},
        "noisy-kfac": {"lr": 3e-3, "kl_weight": 0.3},
        "noisy-ekfac": {"lr": 3e-4, "kl_weight": 0.03},
        "ivon": {"lr": 1.0, "hess_init": 0.1},
    },
    "breast_cancer": {  # 91 validation examples: the mean over the three seeds' splits
        "adam": {"lr": 1e-3},
        "vogn": {"lr": 1e-2, "kl_weight": 0.3},
        "noisy-adam": {"lr": 1e-2, "kl_weight": 0.03},
        "slang": {"lr": 3e-3, "kl_weight": 0.1},
        "noisy-kfac": {"lr": 1e-3, "kl_weight": 0.1},
        "noisy-ekfac": {"lr": 3e-4, "kl_weight": 0.01},
        "ivon": {"lr": 0.3, "hess_init": 0.1},
    },
    "mnist1d": {
        "adam": {"lr": 1e-3},
        "vogn": {"lr": 1e-2, "kl_weight": 0.3},
        "noisy-adam": {"lr": 1e-2, "kl_weight": 0.01},
        "slang": {"lr": 3e-3, "kl_weight": 0.3},
        "noisy-kfac": {"lr": 1e-3, "kl_weight": 0.1},
        "noisy-ekfac": {"lr": 1e-3, "kl_weight": 0.1},
        "ivon": {"lr": 0.3, "hess_init": 0.1},
    },
}


def options_for(
    dataset: str, overrides: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Every method's options on ``dataset``: defaults, then tuned values, then overrides."""
    overrides = overrides or {}
    resolved = {}
    for method, defaults in METHOD_OPTIONS.items():
        given = overrides.get(method, {})
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            valid = ", ".join(defaults) or "none"
            raise ValueError(f"{method} has no option(s) {unknown}; valid: {valid}")
        for name, value in given.items():
            try:
                check(name, value)  # every option has a rule in bayes.hyperparams
            except ValueError as error:
                raise ValueError(f"{method}: {error}") from None
        resolved[method] = {**defaults, **TUNED_OPTIONS.get(dataset, {}).get(method, {}), **given}
    return resolved


def settings_for(dataset: str, overrides: dict[str, Any] | None = None) -> Settings:
    """The dataset's :class:`Settings` with ``overrides`` (field name → value) applied."""
    overrides = dict(overrides or {})
    valid = {f.name for f in fields(Settings)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"Unknown setting(s) {unknown}; valid: {', '.join(sorted(valid))}")
    if isinstance(overrides.get("hidden"), list):
        overrides["hidden"] = tuple(overrides["hidden"])
    return replace(SETTINGS.get(dataset, Settings()), **overrides)


@dataclass
class Run:
    """One method × seed on one dataset; caches the MAP networks that several methods use."""

    dataset: Dataset
    settings: Settings
    seed: int
    options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: copy.deepcopy(METHOD_OPTIONS)
    )
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _map_networks: dict[int, nn.Module] = field(default_factory=dict, repr=False)

    def option(self, method: str, name: str) -> Any:
        return self.options[method][name]

    @property
    def size(self) -> int:
        return len(self.dataset.x_train)

    def network(self, member: int = 0) -> nn.Module:
        """The MLP, initialised by ``(seed, member)``."""
        torch.manual_seed(1000 * self.seed + member)
        sizes = (self.dataset.input_dim, *self.settings.hidden)
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], self.dataset.output_dim))
        return nn.Sequential(*layers).to(self.device)

    def batches(self, member: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """``epochs`` shuffled passes over the training split, in minibatches."""
        generator = torch.Generator().manual_seed(1000 * self.seed + member)
        x = self.dataset.x_train.to(self.device)
        y = self.dataset.y_train.to(self.device)
        for _ in range(self.settings.epochs):
            order = torch.randperm(len(x), generator=generator).to(self.device)
            for idx in order.split(self.settings.batch_size):
                yield x[idx], y[idx]

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The mean negative log-likelihood of a minibatch (constants dropped)."""
        if self.dataset.task == "classification":
            return F.cross_entropy(outputs, targets)
        return 0.5 * (outputs.squeeze(-1) - targets).pow(2).mean() / self.dataset.noise_variance

    def mixture_predictive(self, outputs: Callable[[Tensor], Tensor]) -> Predictive:
        """The predictive of an equal mixture, from a function giving the stacked outputs
        ``(S, N, D)`` of its networks (:func:`ngrl.bayes.predict.mix`); regression gives
        ``(N,)`` means and variances, like the targets."""

        @torch.no_grad()
        def predictive(x: Tensor) -> Prediction:
            prediction = mix(
                outputs(x.to(self.device)),
                self.dataset.task,  # type: ignore[arg-type]
                self.dataset.noise_variance,
            )
            if isinstance(prediction, tuple):
                return prediction[0].reshape(-1), prediction[1].reshape(-1)
            return prediction

        return predictive

    def posterior_predictive(self, model: nn.Module, optimizer: WeightSampler) -> Predictive:
        """Monte Carlo over ``test_samples`` weight samples of a VI optimizer (or IVON)."""
        samples = self.settings.test_samples
        return self.mixture_predictive(lambda x: sample_outputs(model, optimizer, x, samples))

    def map_network(self, member: int = 0) -> nn.Module:
        """The ``adam`` MAP network of ensemble member ``member`` (trained once, cached)."""
        if member not in self._map_networks:
            self._map_networks[member] = self.train_map("adam", member)
        return self._map_networks[member]

    def train_map(self, method: str, member: int = 0) -> nn.Module:
        """A MAP network trained by ``method`` (``adam`` or ``sgd``), weight decay ``λ/N``."""
        model = self.network(member)
        decay = self.settings.prior_precision / self.size
        lr = self.option(method, "lr")
        opt: torch.optim.Optimizer
        if method == "sgd":
            momentum = self.option(method, "momentum")
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=decay)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=decay)
        for x, y in self.batches(member):
            opt.zero_grad()
            self.loss(model(x), y).backward()
            opt.step()
        return model


@dataclass(frozen=True)
class Method:
    """A method: how to train it and, for peers, which package and extra it needs."""

    name: str
    train: Callable[[Run], Predictive]
    module: str | None = None  # the optional package it imports
    extra: str | None = None  # the pip extra that installs it

    def check_available(self) -> None:
        """Raise ``ImportError`` naming the extra when the method's package is missing."""
        if self.module is None:
            return
        try:
            importlib.import_module(self.module)
        except ImportError as error:
            raise ImportError(
                f"method {self.name!r} needs the {self.module!r} package: "
                f"pip install -e '.[{self.extra}]' (or `make peers`)"
            ) from error


def _map(method: str) -> Callable[[Run], Predictive]:
    def train(run: Run) -> Predictive:
        model = run.map_network() if method == "adam" else run.train_map(method)
        return run.mixture_predictive(lambda x: model(x).unsqueeze(0))

    return train


def _variational(
    method: str, make: Callable[..., VariationalOptimizer]
) -> Callable[[Run], Predictive]:
    def train(run: Run) -> Predictive:
        model = run.network()
        opt = make(
            model, run.size, prior_precision=run.settings.prior_precision, **run.options[method]
        )
        for x, y in run.batches():
            with opt.sampled_params(train=True):
                run.loss(model(x), y).backward()
            opt.step()
        return run.posterior_predictive(model, opt)

    return train


def _ivon(run: Run) -> Predictive:
    import ivon

    model = run.network()
    kl_weight = run.option("ivon", "kl_weight")
    opt = ivon.IVON(
        model.parameters(),
        lr=run.option("ivon", "lr"),
        ess=run.size / kl_weight,
        hess_init=run.option("ivon", "hess_init"),
        weight_decay=run.settings.prior_precision / run.size,
    )
    for x, y in run.batches():
        with opt.sampled_params(train=True):
            opt.zero_grad()
            run.loss(model(x), y).backward()
        opt.step()
    return run.posterior_predictive(model, opt)


def _ensemble(run: Run) -> Predictive:
    members = [run.map_network(i) for i in range(run.settings.ensemble_size)]
    return run.mixture_predictive(lambda x: torch.stack([member(x) for member in members]))


def _laplace(run: Run) -> Predictive:
    from laplace import Laplace

    model = copy.deepcopy(run.map_network())
    regression = run.dataset.task == "regression"
    targets = run.dataset.y_train.unsqueeze(1) if regression else run.dataset.y_train
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(run.dataset.x_train.to(run.device), targets.to(run.device)),
        batch_size=run.settings.batch_size,
    )
    la = Laplace(
        model,
        run.dataset.task,
        subset_of_weights="last_layer",
        hessian_structure="kron",
        prior_precision=run.settings.prior_precision,
        sigma_noise=math.sqrt(run.dataset.noise_variance) if regression else 1.0,
    )
    la.fit(loader)
    with warnings.catch_warnings():  # a reminder, always given, to predict with the probit
        warnings.filterwarnings("ignore", message="By default `link_approx` is `probit`")
        la.optimize_prior_precision(method="marglik", pred_type="glm", link_approx="probit")

    @torch.no_grad()
    def predictive(x: Tensor) -> Prediction:
        x = x.to(run.device)
        if not regression:
            return la(x, pred_type="glm", link_approx="probit")
        mean, variance = la(x, pred_type="glm")
        return mean.reshape(-1), variance.reshape(-1) + run.dataset.noise_variance

    return predictive


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("adam", _map("adam")),
        Method("sgd", _map("sgd")),
        Method("vogn", _variational("vogn", VOGN)),
        Method("noisy-adam", _variational("noisy-adam", NoisyAdam)),
        Method("slang", _variational("slang", SLANG)),
        Method("noisy-kfac", _variational("noisy-kfac", NoisyKFAC)),
        Method(
            "noisy-ekfac",
            _variational("noisy-ekfac", functools.partial(NoisyNaturalGradient, curvature="ekfac")),
        ),
        Method("ivon", _ivon, module="ivon", extra="peers"),
        Method("laplace", _laplace, module="laplace", extra="peers"),
        Method("ensemble", _ensemble),
    )
}
