"""Losses: one file per loss; each declares its side and the taps it reads."""

from dfqkit.losses.base import Loss
from dfqkit.losses.bn_stats import BNStatsLoss
from dfqkit.losses.kd import KDLoss
from dfqkit.losses.sim_loss1 import SimLoss1
from dfqkit.losses.sim_loss2 import SimLoss2
from dfqkit.losses.soft_target_ce import SoftTargetCE

__all__ = ["BNStatsLoss", "KDLoss", "Loss", "SimLoss1", "SimLoss2", "SoftTargetCE"]
