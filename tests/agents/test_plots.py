"""agents.plots: the rolling mean, and learning-curve PNGs that are written atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest

from ngrl.agents.plots import plot_learning_curve, rolling_mean

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_rolling_mean_averages_the_last_window_values() -> None:
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = [np.mean(values[max(0, i - 1) : i + 1]) for i in range(5)]
    np.testing.assert_allclose(rolling_mean(values, 2), expected)


def _episodes(path: Path, returns: list[float]) -> Path:
    lines = ["timesteps,return,length,seconds"]
    lines += [f"{10 * (i + 1)},{r},10,{i}" for i, r in enumerate(returns)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_failed_redraw_leaves_the_previous_png_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _episodes(tmp_path / "episodes.csv", [1.0, 2.0, 3.0])
    png = tmp_path / "curve.png"
    plot_learning_curve([log], png, "first")
    first = png.read_bytes()
    assert first.startswith(PNG_MAGIC)

    def failing_savefig(self: matplotlib.figure.Figure, target: Path, **kwargs: object) -> None:
        Path(target).write_bytes(PNG_MAGIC)  # half a file, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", failing_savefig)
    with pytest.raises(OSError, match="disk full"):
        plot_learning_curve([log], png, "second")
    assert png.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png", "episodes.csv"]
