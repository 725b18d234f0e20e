"""Curvature approximations, one per file, each registered under a name.

Importing this package registers them all; ``available()`` lists the names.
"""

from ngrl.curvature.base import CurvatureBlock, available, get_block_class, register
from ngrl.curvature.diagonal import DiagonalBlock
from ngrl.curvature.kfac import KFACBlock

__all__ = [
    "CurvatureBlock",
    "DiagonalBlock",
    "KFACBlock",
    "available",
    "get_block_class",
    "register",
]
