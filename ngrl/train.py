"""``python -m ngrl.train ALGO --env NAME``: the training command line.

The run itself (presets, checkpoints, logs, evaluation) lives in :mod:`ngrl.agents.run`; this
entry point is the one place where the core imports the agents.
"""

from __future__ import annotations

import sys

from ngrl.agents.run import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
