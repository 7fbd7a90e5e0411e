"""FerKD (Shen & Xing, "FerKD: Surgical Label Adaptation for Efficient Distillation", ICCV 2023; the released
code, github.com/szq0214/FKD/tree/main/FerKD, is FKD's training code run on preprocessed soft labels) on kdkit's
teacher cache, whose stored crop/flip views are FKD's stored regions.

* :mod:`~kdkit.methods.ferkd.mining` -- hard-region mining: each image's stored views are ranked by the teacher's
  probability of the true class; the easiest (``ferkd.discard_easy``) and the hardest (``ferkd.discard_hard``)
  shares are never replayed. The kept views are installed on the cache's :class:`~kdkit.cache.ViewReplay` before
  the first batch (loader and cached teacher switch together): image ``i`` reads kept view
  ``(epoch + r_i) mod K'``, so every epoch still sees every image once;
* :mod:`~kdkit.methods.ferkd.loss` -- the ``ferkd`` loss: soft cross-entropy at temperature 1 (FKD's
  ``SoftTargetCrossEntropy``) to the teacher's soft label, except on less-confident regions (true-class probability
  below ``calibrate_below``), whose target is the softened hard label ``(1 - eps) onehot(y) + eps / C``;
* :mod:`~kdkit.methods.ferkd.selfmix` -- SelfMix: each image is CutMixed with a box of another kept view of the same
  image, the target mixed by area between the two regions' (calibrated) labels;
* :mod:`~kdkit.methods.ferkd.method` -- the method: the ``ferkd:`` section, its refusals, the mining statistics.

Against the paper (the abstract and introduction: regions from a crop augmentation fall into easy positives, hard
positives and hard negatives; hard-region mining + calibration of the less-confident regions with softened hard
ground-truth labels; SelfMix, mixing similar regions of the same image to stabilise the mixed soft labels):

* the paper's regions are RandomResizedCrops of ImageNet images with soft labels from large teachers; here they are
  the cache's stored crop/flip views (``teacher.cache.views`` per image) and their stored teacher logits;
* confidence is the teacher's probability of the ground-truth class on the region, as the paper ranks regions;
* the mining's shares (``discard_easy``/``discard_hard``, default 10 % each), the calibration threshold
  (``calibrate_below`` 0.5) and the smoothing (``smoothing`` 0.1) are parameters with kdkit's defaults: the paper's
  exact values could not be read here (only its abstract and introduction were available, and the released code is
  FKD's trainer on FerKD's preprocessed soft labels, which hold the paper's choices baked in), so check them against
  the paper before quoting results as a reproduction;
* SelfMix is CutMix (a box pasted from the other region, labels mixed by the box's area) between two kept views of
  the same image; the paper mixes regions of one image within a batch of FKD's several crops per image. kdkit's
  batches hold one view per image, so the second region is read from the cache beside the batch (its pixels and its
  stored teacher output) instead of being another row of the batch;
* FKD's trainer uses soft cross-entropy at temperature 1 and no separate CE; the recipe does the same
  (``train.ce_weight: 0``; the calibrated targets carry the labels).
"""

from kdkit.methods.ferkd.loss import FerkdLoss, SelfMixPartner, calibrated_targets, ferkd_loss, soft_cross_entropy
from kdkit.methods.ferkd.method import FerkdMethod, FerkdSpec
from kdkit.methods.ferkd.mining import discarded, kept_views, view_confidence
from kdkit.methods.ferkd.selfmix import cutmix_boxes, partner_slots, paste

__all__ = ["FerkdLoss", "FerkdMethod", "FerkdSpec", "SelfMixPartner", "calibrated_targets", "cutmix_boxes",
           "discarded", "ferkd_loss", "kept_views", "partner_slots", "paste", "soft_cross_entropy",
           "view_confidence"]
