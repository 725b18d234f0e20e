"""Variational inference by natural gradient: a Gaussian posterior over the weights.

Imports ngrl only. Public names::

    from bayes import NoisyKFAC, VOGN, SLANG, NoisyAdam, predict
"""

from bayes.base import VariationalOptimizer
from bayes.noisy_adam import NoisyAdam
from bayes.noisy_kfac import NoisyKFAC
from bayes.predict import predict
from bayes.slang import SLANG
from bayes.vogn import VOGN

__all__ = ["SLANG", "VOGN", "NoisyAdam", "NoisyKFAC", "VariationalOptimizer", "predict"]
