"""ngrl: natural-gradient optimizers (K-FAC and its family) for RL and Bayesian deep learning.

The core imports torch only. Public names::

    from ngrl import KFAC, fisher_divergence, fisher_loss
"""

from ngrl.losses import fisher_divergence, fisher_loss
from ngrl.optim import KFAC

__all__ = ["KFAC", "fisher_divergence", "fisher_loss"]
__version__ = "0.1.0"
