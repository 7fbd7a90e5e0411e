"""BACS: Background Aware Continual Semantic Segmentation (ElAraby, Harakeh & Paull, CRV 2024, arXiv:2404.13148).

Class-incremental segmentation (``data.setting: {name: class_incremental, step: 2}``): the step-2 network, grown
from the step-1 model (``model.init: teacher``), learns the new classes from masks that label old classes
background, with the frozen step-1 model as teacher. One loss, ``bacs`` (:class:`~kdkit.methods.bacs.loss.BacsLoss`):

* the backward-background-shift detector (:func:`~kdkit.methods.bacs.loss.detect_shift`): a background-labelled
  pixel nearer, in the old model's features, to a foreground (old-class) centroid than to the background centroid
  is an old class under the background label;
* the background-shift-aware cross-entropy (:func:`~kdkit.methods.bacs.loss.bacs_ce_loss`) down-weights those
  pixels (it replaces the task's cross-entropy: ``train.ce_weight: 0``);
* masked feature distillation (:func:`~kdkit.methods.bacs.loss.masked_feature_kd`) from the old model on the
  background-labelled pixels.

What was read and what is reconstructed: the paper's abstract and third-party summaries (the arXiv HTML's method
section and the official code, whose README says the detector is an auxiliary network judging seen/unseen by the
distance from prototypes, could not be read in detail here). Kept: the detector's principle (distance in latent
space from foreground centroids), its use (down-weighting detected background pixels in the cross-entropy), masked
feature distillation from the old model. Reconstructed (kdkit's, stated in each docstring): the batch's centroids
in the old model's own features from its own predictions (the paper: running-mean prototypes of a learnt projector
kept from previous steps), the nearest-centroid rule (no tuned threshold), the weight 0 of detected pixels, the
mask of the feature distillation (background-labelled pixels) and its squared-distance form. Left out: dark
experience replay (a memory of old images and logits) and the transformer decoder with class tokens (kdkit grows
the 1x1 classifier instead).
"""

from kdkit.methods.bacs.loss import BacsLoss, bacs_ce_loss, centroids, detect_shift, kd_mask, masked_feature_kd

__all__ = ["BacsLoss", "bacs_ce_loss", "centroids", "detect_shift", "kd_mask", "masked_feature_kd"]
