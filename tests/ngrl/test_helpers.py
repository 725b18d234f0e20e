"""The commit recorded with results names the checkout's code."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ngrl.helpers import SOURCE_ROOT, source_commit


@pytest.mark.skipif(
    shutil.which("git") is None or not (SOURCE_ROOT / ".git").exists(),
    reason="runs from a git checkout of ngrl",
)
def test_the_commit_is_the_checkouts_head() -> None:
    head = subprocess.run(
        ["git", "-C", str(SOURCE_ROOT), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    commit = source_commit()
    assert commit is not None
    short = commit.removesuffix("-dirty")
    assert len(short) >= 7 and head.startswith(short)


def test_outside_a_checkout_there_is_no_commit(tmp_path: Path) -> None:
    assert source_commit(tmp_path) is None
