"""Variational inference by natural gradient (noisy K-FAC, VOGN, SLANG) and calibration.

Being built (issues 5 and 6): imports ngrl only.
"""
