"""Environment names, vectorized rollouts and per-rank sharding (Atari, MuJoCo, classic).

Being built (issue 3): imports gymnasium and ale_py, never ngrl's optimizers.
"""
