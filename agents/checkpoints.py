"""Checkpoints written atomically, and read back only after they are checked.

A run folder holds two kinds of file: ``checkpoint.zip``, everything a run continues from
(the policy, the optimizers' state, a ``VecNormalize``'s statistics, all in one file),
and ``model.zip``, what ``predict`` needs (the policy; for the K-FAC agents the optimizer
state, most of a Breakout checkpoint, stays out).
"""

from __future__ import annotations

import pickle
import sys
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.save_util import load_from_zip_file
from stable_baselines3.common.vec_env import VecNormalize

from ngrl.helpers import write_atomically

__all__ = [
    "CheckpointError",
    "PolicyOnlyLoading",
    "has_normalizer",
    "legacy_module_names",
    "load_normalizer",
    "read_run_metadata",
    "save_checkpoint",
    "save_policy",
    "write_atomically",
]

#: Attribute of the model (saved in its zip) naming the CLI algorithm and the environment.
METADATA = "ngrl_run"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or made for another run."""


#: The entry of a checkpoint zip that holds a ``VecNormalize``'s statistics.
NORMALIZER_ENTRY = "vecnormalize.pkl"


@contextmanager
def legacy_module_names() -> Iterator[None]:
    """Let a checkpoint written when ngrl's agents, bayes and envs were top-level packages
    load: its pickles name ``agents.policies`` (the policy class) and ``agents.presets``
    (schedules), which now are ``ngrl.agents.…``. For the duration of the load, each loaded
    ``ngrl.X`` and ``ngrl.X.Y`` module is also ``X`` and ``X.Y`` in ``sys.modules``, unless
    that name is taken (a user's own ``agents`` package keeps its name)."""
    # The modules such pickles name, loaded under their new names first: an alias that
    # is missing would be imported again from its file, as a second copy.
    import ngrl.agents.policies
    import ngrl.agents.presets  # noqa: F401

    before = set(sys.modules)
    for name in list(sys.modules):
        if name.split(".")[:2] in (["ngrl", "agents"], ["ngrl", "bayes"], ["ngrl", "envs"]):
            sys.modules.setdefault(name[len("ngrl.") :], sys.modules[name])
    try:
        yield
    finally:
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("agents", "bayes", "envs"):
                del sys.modules[name]


class PolicyOnlyLoading:
    """Mixin for an SB3 algorithm whose ``load`` also takes a zip that holds the policy
    alone (:func:`save_policy`): the optimizers then start fresh. Checkpoints of older
    versions load too (:func:`legacy_module_names`)."""

    @classmethod
    def load(cls, *args: Any, **kwargs: Any) -> Any:
        with legacy_module_names():
            return super().load(*args, **kwargs)  # type: ignore[misc]

    def set_parameters(  # type: ignore[no-untyped-def]
        self, load_path_or_dict, exact_match: bool = True, device: Any = "auto"
    ) -> None:
        if isinstance(load_path_or_dict, dict) and set(load_path_or_dict) == {"policy"}:
            self.policy.load_state_dict(load_path_or_dict["policy"])  # type: ignore[attr-defined]
            return
        super().set_parameters(load_path_or_dict, exact_match, device)  # type: ignore[misc]


def save_checkpoint(model: BaseAlgorithm, path: Path, metadata: dict[str, Any]) -> None:
    """Save everything a run continues from to ``path``, atomically and in one file: the
    model with its optimizer state (the K-FAC factors) and, for a ``VecNormalize``
    environment, its statistics. ``metadata`` (algorithm, environment) travels inside."""
    env = model.get_env()
    normalizer = env if isinstance(env, VecNormalize) else None
    _save(model, path, metadata, False, normalizer)


def save_policy(model: BaseAlgorithm, path: Path, metadata: dict[str, Any]) -> None:
    """Save what ``predict`` needs to ``path``, atomically: for an algorithm with
    :class:`PolicyOnlyLoading`, the policy without the optimizer state; otherwise the
    whole model; and a ``VecNormalize``'s statistics, which predictions need. It loads
    with ``Algorithm.load`` but is not a checkpoint to resume from."""
    env = model.get_env()
    normalizer = env if isinstance(env, VecNormalize) else None
    _save(model, path, metadata, isinstance(model, PolicyOnlyLoading), normalizer)


def _save(
    model: BaseAlgorithm,
    path: Path,
    metadata: dict[str, Any],
    policy_only: bool,
    normalizer: VecNormalize | None,
) -> None:
    setattr(model, METADATA, {**metadata, "policy_only": policy_only})

    def write(target: Path) -> None:
        with open(target, "wb") as handle:
            model.save(handle)
        if policy_only:
            _drop_entries(
                target,
                keep=lambda name: (
                    not name.endswith(".pth") or name in ("policy.pth", "pytorch_variables.pth")
                ),
            )
        if normalizer is not None:
            with zipfile.ZipFile(target, "a") as archive:
                archive.writestr(NORMALIZER_ENTRY, pickle.dumps(normalizer))  # venv excluded

    write_atomically(path, write)


def _drop_entries(path: Path, keep: Callable[[str], bool]) -> None:
    """Rewrite the zip at ``path`` with only the entries ``keep`` accepts."""
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist() if keep(info.filename)]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for info, content in entries:
            archive.writestr(info, content)


def has_normalizer(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` holds a ``VecNormalize``'s statistics."""
    with zipfile.ZipFile(checkpoint) as archive:
        return NORMALIZER_ENTRY in archive.namelist()


def load_normalizer(checkpoint: Path, venv: Any) -> VecNormalize:
    """The ``VecNormalize`` saved in ``checkpoint``, wrapping ``venv``."""
    with zipfile.ZipFile(checkpoint) as archive:
        normalizer: VecNormalize = pickle.loads(archive.read(NORMALIZER_ENTRY))
    normalizer.set_venv(venv)
    return normalizer


def read_run_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a checkpoint (with the steps it has trained, ``num_timesteps``),
    after checking that the file is a readable model."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a saved model (not a zip file)")
    try:
        with legacy_module_names():
            data, _, _ = load_from_zip_file(path, load_data=True, device="cpu")
    except Exception as error:  # any damage inside the archive
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt ({error})") from None
    metadata = (data or {}).get(METADATA)
    if not isinstance(metadata, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} was not written by ngrl.train")
    if metadata.get("policy_only"):
        raise CheckpointError(
            f"{str(path)!r} holds the trained policy only (for predict and evaluation), not "
            "the optimizer state a run continues from; resume from checkpoint.zip"
        )
    return {**metadata, "num_timesteps": int((data or {}).get("num_timesteps", 0))}
