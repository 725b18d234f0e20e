"""What every natural-gradient VI optimizer shares: sampling, Monte-Carlo gradients, state.

The interface is IVON's (Shen et al. 2024)::

    for x, y in loader:
        with opt.sampled_params(train=True):      # θ ~ q; repeat for more MC samples
            F.cross_entropy(model(x), y).backward()
        opt.step()                                # natural-gradient step on q
    with opt.sampled_params(train=False):         # one prediction sample
        logits = model(x)

The model's parameters hold the posterior mean between blocks; inside a block they hold a
sample, and the mean is written back bit for bit when the block ends, also when it raises.
The loss must be a batch mean (PyTorch's default). The optimizers that need per-example
gradients (VOGN, SLANG, noisy K-FAC) take them from ngrl's capture hooks during the
backward passes inside ``sampled_params(train=True)``: only ``nn.Linear`` and
``nn.Conv1d``/``2d``/``3d`` layers are supported there.

Scaling shared by all: with ``N = dataset_size / kl_weight`` (the KL weighting of
Zhang et al. 2018 divides the dataset size) and prior ``N(0, I/prior_precision)``, the
mean-scale damping is ``λ̃ = prior_precision / N`` and a curvature estimate ``s`` of the
mean loss gives the posterior precision ``N·s + prior_precision``.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ngrl.bayes.hyperparams import check
from ngrl.bayes.posterior import Posterior
from ngrl.capture import Capture
from ngrl.layers import Layer, find_layers
from ngrl.linalg import all_finite, flatten_like

__all__ = ["VariationalOptimizer", "blend_weight"]


def blend_weight(beta: float, step: int) -> float:
    """Weight of the new value in a bias-corrected moving average with decay ``beta``.

    ``x̂_t = (1 − w_t)·x̂_{t−1} + w_t·x_t`` with ``w_t = (1 − β)/(1 − βᵗ)`` is Adam's
    bias-corrected average: the first value is taken as is (``w_1 = 1``).
    """
    return (1.0 - beta) / (1.0 - beta**step) if beta > 0.0 else 1.0


class VariationalOptimizer(torch.optim.Optimizer, ABC):
    """Base class: a Gaussian posterior over all trainable parameters of ``model``.

    Subclasses hold their state in :attr:`vi_state` (tensors and counters, saved by
    :meth:`state_dict`) and implement :meth:`_noise`, :meth:`_update` and
    :meth:`posterior`; those that need per-example gradients set
    ``needs_example_statistics`` and implement :meth:`_record`.
    """

    needs_example_statistics: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        *,
        dataset_size: float,
        lr: float,
        prior_precision: float,
        mc_samples: int,
        kl_weight: float,
        hess_init: float,
        **hyperparameters: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__} takes the model (an nn.Module), got {type(model).__name__}"
            )
        defaults: dict[str, Any] = dict(
            lr=lr,
            dataset_size=dataset_size,
            prior_precision=prior_precision,
            mc_samples=mc_samples,
            kl_weight=kl_weight,
            hess_init=hess_init,
            **hyperparameters,
        )
        for name, value in defaults.items():
            check(name, value)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"Invalid model: {type(model).__name__} has no trainable parameters")
        super().__init__(params, defaults)
        self.model = model
        self.params: list[nn.Parameter] = params
        self.numel = sum(p.numel() for p in params)
        reference = params[0]
        if any(p.dtype != reference.dtype or p.device != reference.device for p in params):
            raise ValueError(
                f"Invalid model: {type(self).__name__} needs all parameters on one device "
                "with one dtype"
            )
        self.layers: list[Layer] = []
        self._index: dict[str, Tensor] = {}
        self._capture: Capture | None = None
        if self.needs_example_statistics:
            self._attach(model)
        self.vi_state: dict[str, Any] = {"step": 0, "momentum": torch.zeros_like(self.flat_mean())}
        self._grad_sum: Tensor | None = None
        self._samples = 0
        self._in_sample = False
        self._reset_samples()
        self._begin_sample()

    # --- per-example statistics ---------------------------------------------------------
    def _attach(self, model: nn.Module) -> None:
        names: dict[int, list[str]] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                names.setdefault(id(module), []).append(name or "<root>")
        repeated = [found for found in names.values() if len(found) > 1]
        if repeated:
            raise ValueError(
                f"Invalid model: {type(self).__name__} needs each layer to run once per "
                f"example, but one module is registered as {' and '.join(repeated[0])}; "
                "use separate modules"
            )
        self.layers = find_layers(model)
        unsupported = [
            f"{layer.name or '<root>'} ({type(layer.module).__name__})"
            for layer in self.layers
            if not layer.kronecker
        ]
        if unsupported:
            raise ValueError(
                f"Invalid model: {type(self).__name__} takes per-example gradients from "
                "nn.Linear and nn.Conv1d/2d/3d (groups=1) layers only; unsupported: "
                f"{', '.join(unsupported)}"
            )
        # Flat position of every entry of each layer's block view Ŵ = [W | b].
        positions = torch.arange(self.numel, device=self.params[0].device)
        by_param = dict(
            zip(
                map(id, self.params),
                positions.split([p.numel() for p in self.params]),
                strict=True,
            )
        )
        for layer in self.layers:
            idx = [by_param[id(p)].reshape(p.shape) for p in layer.params]
            self._index[layer.name] = layer.gather(idx)
        self._capture = Capture(self.layers, self._record)

    def _record(self, layer: Layer, a: Tensor | None, g: Tensor) -> None:
        """Receive one layer's ``"expand"`` statistics of a backward pass."""
        raise NotImplementedError

    def _capture_due(self) -> bool:
        """Whether this step's samples should record per-example statistics."""
        return True

    # --- hyperparameters ----------------------------------------------------------------
    def hyperparameter(self, name: str) -> float:
        return float(check(name, self.param_groups[0][name]))

    @property
    def steps(self) -> int:
        """Number of updates of the posterior taken so far."""
        return int(self.vi_state["step"])

    @property
    def effective_size(self) -> float:
        """``N = dataset_size / kl_weight``: the weight of the data against the prior."""
        return self.hyperparameter("dataset_size") / self.hyperparameter("kl_weight")

    @property
    def prior_damping(self) -> float:
        """``λ̃ = prior_precision / N``: the prior as damping of the mean-loss curvature
        (NoisyKFAC's ``damping`` hyperparameter is an extra term on top of it)."""
        return self.hyperparameter("prior_precision") / self.effective_size

    # --- flat views -----------------------------------------------------------------------
    def flat_mean(self) -> Tensor:
        """The posterior mean (the parameters outside a sampling block), flattened."""
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def _param_parts(self, flat: Tensor) -> dict[int, Tensor]:
        """A flat vector (or a ``(P, *trailing)`` matrix) split into views shaped like the
        parameters (with the trailing dimensions), keyed by ``id(p)``."""
        parts = flat.split([p.numel() for p in self.params])
        trailing = flat.shape[1:]
        return {
            id(p): part.view(*p.shape, *trailing)
            for p, part in zip(self.params, parts, strict=True)
        }

    def _block_views(self, flat: Tensor, names: Iterable[str]) -> dict[str, Tensor]:
        """The block views ``Ŵ = [W | b]`` of the named layers in a flat vector (copies);
        for a ``(P, *trailing)`` matrix, ``(d_out, d_in, *trailing)``.

        Contiguous slices and one concatenation per layer: a gather by flat index
        (``flat[self._index[name]]``) costs several times more on large layers.
        """
        parts = self._param_parts(flat)
        layers = {layer.name: layer for layer in self.layers}
        return {
            name: layers[name].gather([parts[id(p)] for p in layers[name].params]) for name in names
        }

    def _from_block_views(self, views: Mapping[str, Tensor], rest: Tensor) -> Tensor:
        """A flat vector (a ``(P, *trailing)`` matrix, like ``rest``): the layers of
        ``views`` from their block views, every other entry from ``rest``."""
        parts = self._param_parts(rest)
        for layer in self.layers:
            if layer.name in views:
                pieces = layer.scatter(views[layer.name])
                for p, piece in zip(layer.params, pieces, strict=True):
                    parts[id(p)] = piece
        trailing = rest.shape[1:]
        return torch.cat([parts[id(p)].reshape(-1, *trailing) for p in self.params])

    def _add_to_params(self, flat: Tensor, alpha: float = 1.0) -> None:
        for p, part in zip(self.params, flat.split([p.numel() for p in self.params]), strict=True):
            p.add_(part.view_as(p), alpha=alpha)

    def _flat_grad(self) -> Tensor | None:
        grads = [p.grad for p in self.params]
        if all(g is None for g in grads):
            return None
        return flatten_like(grads, self.params)

    # --- sampling ----------------------------------------------------------------------
    @contextmanager
    def sampled_params(self, train: bool = False) -> Iterator[None]:
        """Put a sample ``θ ~ q`` into the model for the duration of the block.

        ``train=True``: the block's backward passes give this sample's gradient (and
        per-example statistics), which :meth:`step` averages over the samples taken since
        the last step. The mean is restored exactly when the block ends, also on error.
        """
        if self._in_sample:
            raise RuntimeError(
                "sampled_params blocks cannot be nested: the inner block would add a second "
                "draw to the first (and count its gradient twice)"
            )
        mean = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            self._add_to_params(self._noise())
        self._in_sample = True
        try:
            if not train:
                yield
                return
            for p in self.params:
                p.grad = None
            self._begin_sample()
            try:
                if self._capture is not None and self._capture_due():
                    with self._capture.active():
                        yield
                else:
                    yield
            except BaseException:
                self._discard_sample()
                raise
            grad = self._flat_grad()
            if grad is None:
                self._discard_sample()
                raise RuntimeError(
                    "no gradient in sampled_params(train=True): call loss.backward() "
                    "inside the block"
                )
            self._end_sample(grad)  # may refuse the sample: count it only afterwards
            # `grad` is a new tensor (the concatenated .grad): the sum may start as it.
            self._grad_sum = grad if self._grad_sum is None else self._grad_sum.add_(grad)
            self._samples += 1
        finally:
            self._in_sample = False
            with torch.no_grad():
                for p, m in zip(self.params, mean, strict=True):
                    p.copy_(m)

    def _begin_sample(self) -> None:
        """A training sample starts: per-sample statistics are cleared."""

    def _end_sample(self, grad: Tensor) -> None:
        """A training sample ended with gradient ``grad`` (flat): keep its statistics."""

    def _discard_sample(self) -> None:
        """A training sample failed: forget its statistics."""

    def _reset_samples(self) -> None:
        """Forget everything accumulated since the last step."""
        self._grad_sum = None
        self._samples = 0

    # --- the update --------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Update the posterior from the samples taken since the last step.

        With a ``closure`` (which computes the loss and calls ``backward``), the step
        first draws ``mc_samples`` samples itself and returns their mean loss.
        """
        loss = None
        if closure is not None:
            losses = []
            for _ in range(int(self.hyperparameter("mc_samples"))):
                with self.sampled_params(train=True), torch.enable_grad():
                    value = closure()
                if isinstance(value, Tensor):
                    losses.append(value.detach())
            loss = torch.stack(losses).mean() if losses else None
        if self._samples == 0 or self._grad_sum is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs at least one backward pass inside "
                "`with optimizer.sampled_params(train=True):` since the last step"
            )
        samples = self._samples
        grad = self._grad_sum if samples == 1 else self._grad_sum / samples
        if not all_finite(grad) or not self._statistics_finite():
            self._reset_samples()
            self._discard_step()
            warnings.warn(
                f"{type(self).__name__}: non-finite gradients or statistics; this step was "
                "skipped and nothing was changed",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss
        self.vi_state["step"] += 1
        try:
            self._update(grad, samples)
        except torch.linalg.LinAlgError as error:  # raised before _update changes anything
            self.vi_state["step"] -= 1
            self._reset_samples()
            self._discard_step()
            warnings.warn(
                f"{type(self).__name__}: the posterior update failed ({error}); this step "
                "was skipped and nothing was changed",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss
        self._reset_samples()
        return loss

    def _statistics_finite(self) -> bool:
        return True

    def _discard_step(self) -> None:
        """Forget the statistics of a skipped step."""

    def _momentum_direction(self, grad: Tensor, beta1: float) -> Tensor:
        """Bias-corrected momentum of ``∇ + λ̃·μ`` (the mean-scale ELBO gradient)."""
        target = grad.add(self.flat_mean(), alpha=self.prior_damping)
        momentum: Tensor = self.vi_state["momentum"]
        weight = blend_weight(beta1, self.steps)
        return momentum.mul_(1.0 - weight).add_(target, alpha=weight)

    @abstractmethod
    def _noise(self) -> Tensor:
        """A flat draw ``θ − μ`` from the current posterior."""

    @abstractmethod
    def _update(self, grad: Tensor, samples: int) -> None:
        """The natural-gradient step of the posterior; ``grad`` is the MC mean gradient.

        May raise ``torch.linalg.LinAlgError``, but only before it changes any state: the
        step is then skipped with a warning."""

    @abstractmethod
    def posterior(self) -> Posterior:
        """The current posterior (copies), for inspection and tests."""

    def _isotropic_precision(self) -> float:
        """The posterior precision before any statistics: ``N·hess_init + prior_precision``."""
        return self.effective_size * self.hyperparameter("hess_init") + self.hyperparameter(
            "prior_precision"
        )

    # --- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["variational"] = {
            key: value.clone() if isinstance(value, Tensor) else value
            for key, value in self._variational_state().items()
        }
        state["variational_kind"] = type(self).__name__
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state of the same optimizer class and model; a state that does not fit
        raises ``ValueError`` and leaves this optimizer as it was."""
        state = dict(state_dict)
        variational = state.pop("variational", None)
        kind = state.pop("variational_kind", None)
        if not isinstance(variational, dict):
            raise ValueError(
                f"Invalid state_dict: not from a variational optimizer ({type(self).__name__} "
                "expects a 'variational' entry)"
            )
        if kind != type(self).__name__:
            raise ValueError(f"Invalid state_dict: from {kind}, not {type(self).__name__}")
        for key, value in variational.items():
            if isinstance(value, Tensor) and not bool(torch.isfinite(value).all()):
                raise ValueError(f"Invalid state_dict: {key!r} is not finite")
        backup = self.state_dict()
        try:
            self._load_variational_state(variational)
            super().load_state_dict(state)
        except (ValueError, KeyError, RuntimeError):
            self.load_state_dict(backup)
            raise
        self._reset_samples()

    def _variational_state(self) -> dict[str, Any]:
        return dict(self.vi_state)

    def _load_variational_state(self, state: dict[str, Any]) -> None:
        """Load :attr:`vi_state` (subclasses load what they keep elsewhere, then call this)."""
        current = self.vi_state
        missing = sorted(set(current) - set(state))
        if missing:
            raise ValueError(f"Invalid state_dict: missing {', '.join(missing)}")
        for key, value in state.items():
            old = current.get(key)
            if isinstance(old, Tensor) and (
                not isinstance(value, Tensor) or value.shape != old.shape
            ):
                raise ValueError(
                    f"Invalid state_dict: {key!r} has shape {getattr(value, 'shape', None)}, "
                    f"expected {tuple(old.shape)}"
                )
        reference = self.params[0]
        self.vi_state = {
            key: value.to(reference.device, reference.dtype).clone()
            if isinstance(value, Tensor) and value.is_floating_point()
            else value
            for key, value in state.items()
        }
