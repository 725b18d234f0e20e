"""The curvature-block interface and the registry of approximations.

A *curvature block* approximates the Fisher block of one layer's parameters. The optimizer
feeds it statistics from captured backward passes and asks it to precondition gradients.
Every approximation is one subclass in its own file, registered under a name with
:func:`register`; agents and variational-inference code only ever see this interface.

Layout of the statistics a block receives (see :mod:`ngrl.capture`):

* ``a``: ``(N, T, d_in)`` layer inputs, the homogeneous coordinate (a column of ones)
  already appended when the layer has a bias; ``T`` is the number of positions that share
  the weight (1 for a dense layer on vectors, the spatial size for a convolution).
* ``g``: ``(N, T, d_out)`` gradients of the per-example loss with respect to the layer's
  outputs, ``g_n = d loss_n / d s_n``.

Vector order: the block's matrix view of the gradient is ``Ŵ = [W | b]`` of shape
``(d_out, d_in)``, flattened row-major, so for K-FAC ``to_dense() == kron(G, A)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from ngrl.linalg import all_finite

__all__ = [
    "CurvatureBlock",
    "ExampleStatisticsBlock",
    "PendingStatistics",
    "available",
    "blend",
    "checked_state",
    "get_block_class",
    "register",
    "damped_inverse",
    "eigenbasis_power",
    "eigenbasis_sample",
    "eigenbasis_solve",
    "factored_kronecker",
    "kronecker_dense",
    "matrix_shape",
    "pi_split",
    "symmetric_eigh",
]


class CurvatureBlock(ABC):
    """One layer's Fisher approximation: statistics in, preconditioned gradients out.

    Life cycle, driven by :class:`ngrl.optim.KFAC`:

    1. ``accumulate(a, g)`` once per captured backward pass (adds to a pending batch);
    2. ``commit(factor_decay)`` folds the pending batch into the running statistics
       (the first commit sets them, later ones blend ``F ← d·F + (1−d)·batch``);
    3. ``refresh()`` recomputes whatever is expensive to derive (eigendecompositions),
       every ``inv_update_steps`` steps;
    4. ``precondition(grad, damping)`` returns ``(F̂ + damping·I)⁻¹ grad`` in matrix form.

    Options a block takes beyond its ``shape`` are keyword arguments of its constructor,
    passed by ``KFAC(curvature_options=...)``.
    """

    #: Shape of the gradient this block preconditions, e.g. ``(d_out, d_in)``.
    shape: tuple[int, ...]
    #: Keys of :meth:`state_dict` (stored in the optimizer state of the layer's first parameter).
    state_keys: tuple[str, ...] = ()
    #: How data-parallel ranks keep this block identical (:mod:`ngrl.distributed`):
    #: ``"average"``: the running statistics (the attributes named in :attr:`state_keys`)
    #: are exponential averages of batch statistics, so averaging them over the ranks after
    #: a commit equals committing the union batch, and every rank refreshes the block;
    #: ``"share"``: the same, and :meth:`refresh` sets only :attr:`derived_keys` (tensors),
    #: so one rank refreshes and sends :meth:`derived_state` to the others; ``"local"``:
    #: statistics from power iterations, a basis chosen at the first batch, or a window of
    #: examples, which cannot be averaged (refused under ``torch.distributed``).
    data_parallel: Literal["average", "share", "local"] = "average"

    #: Attributes holding what :meth:`refresh` derived (each ``None`` or a tuple of tensors
    #: and floats). Checkpoints taken between two refreshes carry them
    #: (:meth:`derived_state`), so that a resumed run continues bit for bit.
    derived_keys: tuple[str, ...] = ()

    def derived_state(self) -> dict[str, tuple[Tensor | float, ...]]:
        """Copies of the derived quantities in use (the keys of :attr:`derived_keys` that are
        set)."""
        state = {}
        for key in self.derived_keys:
            value = getattr(self, key)
            if value is not None:
                state[key] = tuple(v.clone() if isinstance(v, Tensor) else v for v in value)
        return state

    def install_derived(self, state: Mapping[str, tuple[Tensor | float, ...]]) -> None:
        """Use the derived quantities ``state`` (a :meth:`derived_state`, e.g. computed by
        another rank) from now on, as they are."""
        for key, value in state.items():
            setattr(self, key, tuple(value))

    def load_derived_state(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        """Install a :meth:`derived_state` (after :meth:`load_state_dict`, which clears it);
        ``ValueError`` for unknown keys or non-finite values, before anything changes."""
        unknown = sorted(set(state) - set(self.derived_keys))
        if unknown:
            raise ValueError(
                f"Invalid state_dict: {type(self).__name__} derives no {', '.join(unknown)}"
            )
        loaded = {}
        for key, value in state.items():
            if not isinstance(value, (tuple, list)) or not all(
                isinstance(v, (Tensor, float)) for v in value
            ):
                raise ValueError(f"Invalid state_dict: derived {key!r} is not a tuple of tensors")
            if not all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in value):
                raise ValueError(f"Invalid state_dict: derived {key!r} is not finite")
            loaded[key] = tuple(v.to(device) if isinstance(v, Tensor) else v for v in value)
        self.install_derived(loaded)

    def running_statistics(self) -> list[Tensor]:
        """The running statistics themselves (not copies), for averaging across ranks."""
        return [t for t in (getattr(self, key, None) for key in self.state_keys) if t is not None]

    @abstractmethod
    def accumulate(self, a: Tensor | None, g: Tensor) -> None:
        """Add the statistics of one captured batch to the pending estimate."""

    @abstractmethod
    def pending_is_finite(self) -> bool:
        """Whether every pending statistic is finite (``True`` when nothing is pending)."""

    @abstractmethod
    def commit(self, factor_decay: float) -> None:
        """Fold the pending statistics into the running ones and clear them."""

    @abstractmethod
    def discard(self) -> None:
        """Forget the pending statistics (used when they are not finite)."""

    @property
    @abstractmethod
    def initialized(self) -> bool:
        """Whether running statistics exist, i.e. the block can precondition."""

    @abstractmethod
    def refresh(self, damping: float) -> None:
        """Recompute the derived quantities (eigenbases, inverses) from the statistics.

        ``damping`` is the current damping, for rules that fold it into the inverses.
        """

    @abstractmethod
    def precondition(self, grad: Tensor, damping: float) -> Tensor:
        """Return ``(F̂ + damping·I)⁻¹ grad`` with ``grad`` of shape :attr:`shape`."""

    def multiply_matpower(self, v: Tensor, damping: float, power: float) -> Tensor:
        """``(F̂ + damping·I)^power v`` for ``v`` of shape :attr:`shape` (kfac-jax's name
        and meaning): ``−1`` preconditions a gradient, ``−½`` turns white noise into a
        sample of a Gaussian with that precision, ``+1`` gives the quadratic form.

        The matrix is the one :meth:`precondition` inverts (:meth:`damped_dense`, with the
        decompositions of the last :meth:`refresh`). Powers a block cannot take exactly
        raise ``NotImplementedError`` naming the block and the power.
        """
        if power == -1.0:
            return self.precondition(v, damping)
        assert self.initialized, "multiply_matpower() before any statistics"
        return self._matpower(v, damping, float(power))

    def sample_matpower(self, damping: float, power: float) -> Tensor:
        """``(F̂ + damping·I)^power z`` for one draw ``z ~ N(0, I)`` of shape :attr:`shape`:
        a Gaussian sample with covariance ``(F̂ + damping·I)^{2·power}`` (``−½``: the
        posterior sample of a precision ``F̂ + λI``). Blocks with an eigenbasis draw ``z``
        in it, the same distribution for half the matrix products."""
        like = self._statistic_like()
        z = torch.randn(self.shape, dtype=like.dtype, device=like.device)
        return self.multiply_matpower(z, damping, power)

    def _statistic_like(self) -> Tensor:
        """A floating-point tensor the block holds (for the dtype and device of new ones)."""
        for value in vars(self).values():
            if isinstance(value, Tensor) and value.is_floating_point():
                return value
        raise AssertionError("sample_matpower() before any statistics")

    def _matpower(self, v: Tensor, damping: float, power: float) -> Tensor:
        """The powers other than −1 (subclasses that can take them exactly)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no exact matrix power {power:g} (only -1)"
        )

    @abstractmethod
    def to_dense(self) -> Tensor:
        """The approximate Fisher block as a dense matrix, in the vector order above."""

    def damped_dense(self, damping: float) -> Tensor:
        """The dense matrix that :meth:`precondition` inverts at this ``damping``.

        ``to_dense() + damping·I`` for exact Tikhonov damping (the default); blocks with a
        cheaper damping rule (factored damping) override it with the matrix they invert.
        """
        dense = self.to_dense()
        return dense + damping * torch.eye(dense.shape[0], dtype=dense.dtype, device=dense.device)

    @abstractmethod
    def state_dict(self) -> dict[str, Tensor]:
        """The running statistics (never derived quantities, which are recomputed)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore the running statistics written by :meth:`state_dict`."""


class PendingStatistics:
    """The ``(a, g)`` pairs of the captured passes not yet committed, for blocks that need
    every example (per-example gradients, power iterations) rather than running sums."""

    def __init__(self) -> None:
        self._pairs: list[tuple[Tensor, Tensor]] = []
        self._derived: tuple[Tensor, ...] | None = None

    def add(self, a: Tensor | None, g: Tensor, block: str) -> None:
        if a is None:
            raise ValueError(f"{block} needs the layer inputs `a` (a dense or conv layer)")
        self._pairs.append((a, g))

    def is_finite(self) -> bool:
        return all(all_finite(a, g) for a, g in self._pairs)

    def batch(self) -> tuple[Tensor, Tensor] | None:
        """All pending pairs as one batch ``(a, g)`` (concatenated examples), or ``None``."""
        if not self._pairs:
            return None
        if len(self._pairs) == 1:
            return self._pairs[0]
        return torch.cat([a for a, _ in self._pairs]), torch.cat([g for _, g in self._pairs])

    def derived(
        self, compute: Callable[[Tensor, Tensor], tuple[Tensor, ...]]
    ) -> tuple[Tensor, ...] | None:
        """``compute(a, g)`` of the pending batch, computed once (``None`` if nothing is
        pending). Blocks whose batch statistics are derived (power iterations) check
        these for finiteness before the commit, since a finite batch can overflow them."""
        if self._derived is None:
            batch = self.batch()
            if batch is not None:
                self._derived = compute(*batch)
        return self._derived

    def derived_is_finite(self, compute: Callable[[Tensor, Tensor], tuple[Tensor, ...]]) -> bool:
        """Raw pairs and ``compute``'s results all finite (``True`` when nothing is pending)."""
        if not self.is_finite():
            return False
        terms = self.derived(compute)
        return terms is None or all_finite(*terms)

    def clear(self) -> None:
        self._pairs = []
        self._derived = None


class ExampleStatisticsBlock(CurvatureBlock):
    """A block that keeps every captured example until the commit (per-example gradients,
    power iterations), and whose running statistics are the tensors named in
    :attr:`state_keys`, each of the shape :meth:`state_shapes` gives."""

    #: Name used in error messages.
    name = "curvature block"

    def __init__(self) -> None:
        self._pending = PendingStatistics()

    def accumulate(self, a: Tensor | None, g: Tensor) -> None:
        self._pending.add(a, g, self.name)

    def pending_is_finite(self) -> bool:
        return self._pending.is_finite()

    def discard(self) -> None:
        self._pending.clear()

    @abstractmethod
    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each running statistic, keyed like :attr:`state_keys`."""

    def forget_derived(self) -> None:
        """Drop derived quantities (inverses) after the statistics were replaced."""

    def state_dict(self) -> dict[str, Tensor]:
        if not self.initialized:
            return {}
        return {key: getattr(self, key).clone() for key in self.state_keys}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.discard()
        self.forget_derived()
        if not state:
            for key in self.state_keys:
                setattr(self, key, None)
            return
        loaded = {
            key: checked_state(state, key, shape, self.name)
            for key, shape in self.state_shapes().items()
        }
        for key, value in loaded.items():
            setattr(self, key, value)


def blend(running: Tensor | None, batch: Tensor, factor_decay: float) -> Tensor:
    """Exponential moving average ``d·running + (1−d)·batch``; the first batch is taken as is."""
    if running is None:
        return batch.clone()
    return running.mul_(factor_decay).add_(batch, alpha=1.0 - factor_decay)


def checked_state(state: dict[str, Tensor], key: str, shape: tuple[int, ...], block: str) -> Tensor:
    """A copy of ``state[key]`` after checking its shape and that it is finite.

    Used by every block's ``load_state_dict`` so that a checkpoint that does not fit, or
    holds NaNs, is refused with a ``ValueError`` naming the statistic and the block.
    """
    if key not in state:
        raise ValueError(f"{block} checkpoint has no {key!r}")
    value = state[key]
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"{block} statistic {key!r} of shape {tuple(value.shape)} does not fit a "
            f"layer that needs {tuple(shape)}"
        )
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise ValueError(f"{block} statistic {key!r} in the checkpoint is not finite")
    return value.clone()


_REGISTRY: dict[str, Callable[..., CurvatureBlock]] = {}


def register(name: str) -> Callable[[type[CurvatureBlock]], type[CurvatureBlock]]:
    """Class decorator: make an approximation available as ``KFAC(curvature=name)``."""

    def decorate(cls: type[CurvatureBlock]) -> type[CurvatureBlock]:
        if name in _REGISTRY:
            raise ValueError(f"curvature {name!r} is registered twice")
        _REGISTRY[name] = cls
        return cls

    return decorate


def available() -> list[str]:
    """Names of the registered curvature approximations."""
    return sorted(_REGISTRY)


def get_block_class(name: str) -> Callable[..., CurvatureBlock]:
    """Look up a registered approximation; an unknown name lists the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Invalid curvature: {name!r}; available: {', '.join(available())}"
        ) from None


def jitter(scale: float, attempt: int) -> float:
    """The diagonal jitter of retry ``attempt`` (1, 2, …): ``1e-10, 1e-8, …`` × ``scale``."""
    return scale * 10.0 ** (2 * attempt - 12)


def symmetric_eigh(
    matrix: Tensor, float64_max_dim: int = 1024, max_tries: int = 4, psd: bool = True
) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric (PSD) factor that does not fail on bad conditioning.

    Small factors (``dim <= float64_max_dim``) are decomposed in float64. When ``eigh``
    fails to converge, the factor is retried in float64 with a growing jitter on the
    diagonal (``1e-10, 1e-8, …`` times its mean eigenvalue). Eigenvalues are clamped at
    zero when ``psd`` (a PSD factor has no negative ones, only rounding makes them); pass
    ``psd=False`` for an indefinite matrix.
    Returns ``(eigenvalues, eigenvectors)`` in the factor's dtype.
    """
    dtype = matrix.dtype
    dim = matrix.shape[0]
    work = matrix.double() if dim <= float64_max_dim else matrix
    work = 0.5 * (work + work.T)
    scale = float(work.diagonal().abs().mean()) or 1.0
    eye = torch.eye(dim, dtype=work.dtype, device=work.device)
    error: Exception | None = None
    for attempt in range(max_tries):
        try:
            jittered = work if attempt == 0 else work + jitter(scale, attempt) * eye
            values, vectors = torch.linalg.eigh(jittered)
            if psd:
                values = values.clamp_(min=0.0)
            return values.to(dtype), vectors.to(dtype)
        except RuntimeError as err:  # torch raises LinAlgError (a RuntimeError)
            error = err
            work = work.double()
            eye = eye.double()
    raise RuntimeError(f"eigendecomposition failed after {max_tries} tries") from error


def jittered_cholesky(matrix: Tensor, max_tries: int = 4) -> Tensor | None:
    """The Cholesky factor of a symmetric PD matrix, in float64, or ``None``.

    When the factorisation fails (numerically not positive definite: a rank-deficient
    matrix under a tiny damping), it is retried with a growing jitter on the diagonal
    (``1e-10, 1e-8, …`` times its mean diagonal), as :func:`symmetric_eigh` does.
    """
    work = matrix.double()
    work = 0.5 * (work + work.T)
    scale = float(work.diagonal().abs().mean()) or 1.0
    for attempt in range(max_tries):
        jittered = work.clone()
        if attempt:
            jittered.diagonal().add_(jitter(scale, attempt))
        factor, info = torch.linalg.cholesky_ex(jittered)
        if int(info) == 0 and bool(torch.isfinite(factor).all()):
            return factor
    return None


def damped_inverse(matrix: Tensor, damping: float, float64_max_dim: int = 1024) -> Tensor:
    """``(M + damping·I)⁻¹`` of a symmetric PSD factor, by Cholesky.

    Small factors are inverted in float64; if the Cholesky factorisation fails (the damped
    factor is numerically not positive definite) the inverse is built from
    :func:`symmetric_eigh` instead, which cannot fail the same way.
    """
    dtype = matrix.dtype
    work = matrix.double() if matrix.shape[0] <= float64_max_dim else matrix
    damped = 0.5 * (work + work.T)
    damped.diagonal().add_(damping)
    factor, info = torch.linalg.cholesky_ex(damped)
    if int(info) == 0:
        return torch.cholesky_inverse(factor).to(dtype)
    values, vectors = symmetric_eigh(matrix, float64_max_dim)
    return (vectors / (values + damping)) @ vectors.T


def eigenbasis_solve(
    grad: Tensor, g_vectors: Tensor, a_vectors: Tensor, eigenvalues: Tensor, damping: float
) -> Tensor:
    """``X`` with ``vec(X) = ((Q_G⊗Q_A) diag(vec S) (Q_G⊗Q_A)ᵀ + λI)⁻¹ vec(∇)``.

    The damped solve of every block that is diagonal in a Kronecker eigenbasis (K-FAC,
    TKFAC, EKFAC, KPSVD, Shampoo): rotate into the basis, divide by ``S + λ``, rotate back,
    ``X = Q_G [(Q_Gᵀ ∇ Q_A) / (S + λ)] Q_Aᵀ``. ``eigenvalues`` is ``S``, ``(d_out, d_in)``.
    """
    rotated = g_vectors.T @ grad @ a_vectors
    rotated /= eigenvalues + damping
    return g_vectors @ rotated @ a_vectors.T


def eigenbasis_power(
    v: Tensor, g_vectors: Tensor, a_vectors: Tensor, eigenvalues: Tensor, power: float
) -> Tensor:
    """``M^power v`` for ``M = (Q_G⊗Q_A) diag(vec S) (Q_G⊗Q_A)ᵀ`` with every ``S > 0``
    (the damping already added): ``Q_G [(Q_Gᵀ v Q_A) · S^power] Q_Aᵀ``."""
    rotated = g_vectors.T @ v @ a_vectors
    rotated *= eigenvalues.pow(power)
    return g_vectors @ rotated @ a_vectors.T


def eigenbasis_sample(
    g_vectors: Tensor, a_vectors: Tensor, eigenvalues: Tensor, power: float
) -> Tensor:
    """``M^power z`` for one ``z ~ N(0, I)``, ``M`` as in :func:`eigenbasis_power`, drawn
    in the eigenbasis (``Q_Gᵀ z Q_A`` is white noise too): ``Q_G [ζ · S^power] Q_Aᵀ``."""
    noise = torch.randn_like(eigenvalues) * eigenvalues.pow(power)
    return g_vectors @ noise @ a_vectors.T


def kronecker_dense(g_vectors: Tensor, a_vectors: Tensor, eigenvalues: Tensor) -> Tensor:
    """``(Q_G⊗Q_A) diag(vec S) (Q_G⊗Q_A)ᵀ`` as a dense matrix (for :meth:`to_dense`)."""
    basis = torch.kron(g_vectors, a_vectors)
    return (basis * eigenvalues.reshape(-1)) @ basis.T


def factored_kronecker(g_factor: Tensor, a_factor: Tensor, damping: float) -> Tensor:
    """``(G + γ_G I) ⊗ (A + γ_A I)`` with the π split of :func:`pi_split`, dense: the
    matrix a factored-damping rule inverts (for :meth:`CurvatureBlock.damped_dense`)."""
    a_damping, g_damping = pi_split(a_factor, g_factor, damping)
    eye_a = torch.eye(a_factor.shape[0], dtype=a_factor.dtype, device=a_factor.device)
    eye_g = torch.eye(g_factor.shape[0], dtype=g_factor.dtype, device=g_factor.device)
    return torch.kron(g_factor + g_damping * eye_g, a_factor + a_damping * eye_a)


def matrix_shape(
    shape: tuple[int, ...], block: str, damping_rule: str = "exact"
) -> tuple[int, int]:
    """``(d_out, d_in)`` of a block that preconditions a matrix view, after checking the
    shape and the damping rule (``"exact"`` or ``"factored"``) with a ``ValueError``."""
    if len(shape) != 2:
        raise ValueError(f"{block} needs a (d_out, d_in) gradient shape, got {shape}")
    if damping_rule not in ("exact", "factored"):
        raise ValueError(f"Invalid damping_rule: {damping_rule!r} (use 'exact' or 'factored')")
    return int(shape[0]), int(shape[1])


def pi_split(a_factor: Tensor, g_factor: Tensor, damping: float) -> tuple[float, float]:
    """``(γ_A, γ_G)`` of factored damping: ``γ_A γ_G = λ``, split by the factors' traces.

    Martens & Grosse 2015, §6.3: ``γ_A = π√λ``, ``γ_G = √λ/π`` with
    ``π² = (tr A / d_in) / (tr G / d_out)``; ``π = 1`` when a trace is not positive.
    A factor given as a vector is a diagonal matrix (the embedding's input factor).
    """
    a_mean = float((a_factor.diagonal() if a_factor.dim() == 2 else a_factor).mean())
    g_mean = float((g_factor.diagonal() if g_factor.dim() == 2 else g_factor).mean())
    pi = (a_mean / g_mean) ** 0.5 if a_mean > 0.0 and g_mean > 0.0 else 1.0
    root = damping**0.5
    return pi * root, root / pi
