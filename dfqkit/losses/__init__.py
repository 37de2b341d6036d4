"""Losses: one file per loss; each declares its side and the taps it reads."""

from dfqkit.losses.adasg import AdaptiveMarginLoss, DifferenceEntropyLoss
from dfqkit.losses.base import Loss
from dfqkit.losses.bn_stats import BNStatsLoss
from dfqkit.losses.dsg import DSGSlackBNSLoss, EigenStructureLoss
from dfqkit.losses.kd import KDLoss
from dfqkit.losses.patch_similarity import PatchSimilarityEntropy
from dfqkit.losses.sigma_entropy import SigmaEntropyFloor
from dfqkit.losses.sim_loss1 import SimLoss1
from dfqkit.losses.sim_loss2 import SimLoss2
from dfqkit.losses.soft_target_ce import SoftTargetCE
from dfqkit.losses.synthesis import (
    FeatureAttentionLoss,
    FocalCE,
    ImagePrior,
    IntraClassMarginLoss,
    TargetProbabilityLoss,
    ZeroQBNSLoss,
)
from dfqkit.losses.tv_prior import TVPrior

__all__ = [
    "AdaptiveMarginLoss",
    "DifferenceEntropyLoss",
    "BNStatsLoss",
    "DSGSlackBNSLoss",
    "EigenStructureLoss",
    "FeatureAttentionLoss",
    "FocalCE",
    "ImagePrior",
    "IntraClassMarginLoss",
    "KDLoss",
    "Loss",
    "PatchSimilarityEntropy",
    "SigmaEntropyFloor",
    "SimLoss1",
    "SimLoss2",
    "SoftTargetCE",
    "TargetProbabilityLoss",
    "TVPrior",
    "ZeroQBNSLoss",
]
