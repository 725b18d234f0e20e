"""ngrl.agents.records: a resumed run's clock over older records that restarted it."""

from __future__ import annotations

from pathlib import Path

from ngrl.agents.records import continue_episodes


def test_a_resume_continues_the_clock_of_a_chain_of_older_records(tmp_path: Path) -> None:
    # Written by a run resumed once before its clock went on: it restarts at zero at 30.
    previous = tmp_path / "episodes.csv"
    rows = ["10,1.0,5,100.0", "20,1.0,5,200.0", "30,1.0,5,2.0", "40,1.0,5,50.0", "50,1.0,5,60.0"]
    previous.write_text("timesteps,return,length,seconds\n" + "\n".join(rows) + "\n")
    target = tmp_path / "resumed.csv"
    assert continue_episodes(previous, target, up_to_step=40) == 250.0
    assert target.read_text().splitlines()[1:] == rows[:4]
    assert continue_episodes(tmp_path / "none.csv", tmp_path / "t.csv", up_to_step=40) == 0.0
