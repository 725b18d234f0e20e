"""Variational inference by natural gradient: a Gaussian posterior over the weights.

Imports ngrl only. Public names::

    from ngrl.bayes import NoisyKFAC, NoisyNaturalGradient, VOGN, SLANG, NoisyAdam, predict
"""

from ngrl.bayes.base import VariationalOptimizer
from ngrl.bayes.noisy_adam import NoisyAdam
from ngrl.bayes.noisy_kfac import NoisyKFAC
from ngrl.bayes.noisy_natural_gradient import NoisyNaturalGradient
from ngrl.bayes.predict import predict
from ngrl.bayes.slang import SLANG
from ngrl.bayes.vogn import VOGN

__all__ = [
    "SLANG",
    "VOGN",
    "NoisyAdam",
    "NoisyKFAC",
    "NoisyNaturalGradient",
    "VariationalOptimizer",
    "predict",
]
