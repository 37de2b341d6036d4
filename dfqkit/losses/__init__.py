"""Losses: one file per loss; each declares its side and the taps it reads."""

from dfqkit.losses.base import Loss
from dfqkit.losses.bn_stats import BNStatsLoss
from dfqkit.losses.kd import KDLoss
from dfqkit.losses.soft_target_ce import SoftTargetCE

__all__ = ["BNStatsLoss", "KDLoss", "Loss", "SoftTargetCE"]
