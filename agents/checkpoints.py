"""Checkpoints written atomically, and read back only after they are checked."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.save_util import load_from_zip_file
from stable_baselines3.common.vec_env import VecNormalize

__all__ = [
    "CheckpointError",
    "normalizer_path",
    "read_run_metadata",
    "save_checkpoint",
    "write_atomically",
]

#: Attribute of the model (saved in its zip) naming the CLI algorithm and the environment.
METADATA = "ngrl_run"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or made for another run."""


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to a temporary file beside ``path``, then rename it over ``path``.

    A crash leaves either the old file or the new one, never half of one.
    """
    partial = path.with_name(path.name + ".part")
    try:
        write(partial)
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def normalizer_path(checkpoint: Path) -> Path:
    """Where the observation/reward normalisation statistics of a checkpoint live."""
    return checkpoint.with_name(checkpoint.stem + "_vecnormalize.pkl")


def save_checkpoint(model: BaseAlgorithm, path: Path, metadata: dict[str, Any]) -> None:
    """Save ``model`` (with its optimizer state: the K-FAC factors) to ``path`` atomically.

    ``metadata`` (algorithm and environment) travels inside the zip; a ``VecNormalize``
    environment's statistics are saved beside it.
    """
    setattr(model, METADATA, dict(metadata))

    def write_model(target: Path) -> None:
        with open(target, "wb") as handle:
            model.save(handle)

    write_atomically(path, write_model)
    env = model.get_env()
    if isinstance(env, VecNormalize):
        write_atomically(normalizer_path(path), lambda target: env.save(str(target)))


def read_run_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a checkpoint (with the steps it has trained, ``num_timesteps``),
    after checking that the file is a readable model."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a saved model (not a zip file)")
    try:
        data, _, _ = load_from_zip_file(path, load_data=True, device="cpu")
    except Exception as error:  # any damage inside the archive
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt ({error})") from None
    metadata = (data or {}).get(METADATA)
    if not isinstance(metadata, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} was not written by ngrl.train")
    return {**metadata, "num_timesteps": int((data or {}).get("num_timesteps", 0))}
