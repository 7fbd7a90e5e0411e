"""Distillation losses: pure functions plus thin registered modules."""

from kdkit.losses.base import LOSSES, DistillLoss, register_loss
from kdkit.losses.kd import KDLoss, MSELoss, kd_loss, mse_loss

__all__ = ["LOSSES", "DistillLoss", "KDLoss", "MSELoss", "kd_loss", "mse_loss", "register_loss"]
