"""Distillation losses: pure functions plus thin registered modules (``kdkit ls losses``)."""

from kdkit.losses import (  # noqa: F401 - each module registers its losses on import
    acam,
    affinity,
    at,
    bckd,
    cka,
    composed,
    crd,
    cs_div,
    cwd,
    dist,
    dkd,
    fgd,
    fitnets,
    iod,
    ld,
    mgd,
    mlkd,
    multi_teacher,
    multilabel,
    multitask_kd,
    old_det_kd,
    old_kd,
    pairwise_kd,
    pcka,
    pixel_kd,
    pkd,
    reviewkd,
    rkd,
    sp,
)
from kdkit.losses.base import LOSSES, DistillLoss, register_loss
from kdkit.losses.kd import KDLoss, MSELoss, kd_loss, mse_loss
from kdkit.losses.standardize import standardize_logits

__all__ = ["LOSSES", "DistillLoss", "KDLoss", "MSELoss", "kd_loss", "mse_loss", "register_loss",
           "standardize_logits"]
