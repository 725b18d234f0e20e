"""Second-order optimizers built on :mod:`ngrl.curvature`."""

from ngrl.optim.config import KFACConfig
from ngrl.optim.conjugate_gradient import conjugate_gradient, fisher_vector_product, flat_grad
from ngrl.optim.kfac import KFAC, CurvatureFallbackWarning
from ngrl.optim.trust_region import kl_clip_scale

__all__ = [
    "KFAC",
    "CurvatureFallbackWarning",
    "KFACConfig",
    "conjugate_gradient",
    "fisher_vector_product",
    "flat_grad",
    "kl_clip_scale",
]
