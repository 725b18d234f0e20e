"""Second-order optimizers built on :mod:`ngrl.curvature`."""

from ngrl.optim.kfac import KFAC
from ngrl.optim.trust_region import kl_clip_scale

__all__ = ["KFAC", "kl_clip_scale"]
