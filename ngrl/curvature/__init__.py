"""Curvature approximations, one per file, each registered under a name.

Importing this package registers them all; ``available()`` lists the names.
"""

from ngrl.curvature.base import CurvatureBlock, available, get_block_class, register
from ngrl.curvature.deflation import DeflationBlock
from ngrl.curvature.dense import DenseBlock
from ngrl.curvature.diagonal import DiagonalBlock
from ngrl.curvature.ekfac import EKFACBlock
from ngrl.curvature.embedding import EmbeddingBlock
from ngrl.curvature.kfac import KFACBlock
from ngrl.curvature.kfac_corrected import KFACCorrectedBlock
from ngrl.curvature.kpsvd import KPSVDBlock
from ngrl.curvature.mfac import MFACBlock
from ngrl.curvature.recurrent_chain import RecurrentChainBlock
from ngrl.curvature.shampoo import ShampooBlock
from ngrl.curvature.tkfac import TKFACBlock

__all__ = [
    "CurvatureBlock",
    "DeflationBlock",
    "DenseBlock",
    "DiagonalBlock",
    "EmbeddingBlock",
    "EKFACBlock",
    "KFACBlock",
    "KFACCorrectedBlock",
    "KPSVDBlock",
    "MFACBlock",
    "RecurrentChainBlock",
    "ShampooBlock",
    "TKFACBlock",
    "available",
    "get_block_class",
    "register",
]
