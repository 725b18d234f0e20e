"""RL agents on ngrl: ACKTR and natural policy gradient as Stable-Baselines3 algorithms.

Being built (issue 4): imports ngrl, envs and stable_baselines3, never the reverse.
"""
