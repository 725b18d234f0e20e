"""Standard-library helpers shared by the CLI, the agents and the scripts (no torch, no
SB3): files written atomically, ``KEY=VALUE`` overrides read as TOML values, and the
commit of the code that ran."""

from __future__ import annotations

import argparse
import os
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_override_option", "parse_override", "source_commit", "write_atomically"]

#: The checkout ngrl runs from when it is installed in place (``pip install -e``).
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def source_commit(root: Path = SOURCE_ROOT) -> str | None:
    """The git commit of the checkout at ``root`` (``git describe --always --dirty``:
    e.g. ``ac58e2b`` or ``ac58e2b-dirty`` with uncommitted changes), recorded with every
    result so a figure names the code that made it; ``None`` where ``root`` is not a
    checkout (an installed wheel) or git is missing."""
    if not (root / ".git").exists():
        return None
    try:
        described = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return described.stdout.strip() or None


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


def add_override_option(parser: argparse.ArgumentParser, help: str) -> None:
    """The repeatable ``--set KEY=VALUE`` option (into ``args.overrides``), read by
    :func:`parse_override`."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` with the value read as a TOML literal (a bare word is a string)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--set takes key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value
