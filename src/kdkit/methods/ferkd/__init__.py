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

What is implemented as the paper describes it and what is kdkit's own choice is listed in the module docstrings
above and in ``recipes/fashion_mnist/ferkd_cached.yaml``.
"""

from kdkit.methods.ferkd.loss import FerkdLoss, SelfMixPartner, calibrated_targets, ferkd_loss, soft_cross_entropy
from kdkit.methods.ferkd.method import FerkdMethod, FerkdSpec
from kdkit.methods.ferkd.mining import discarded, kept_views, view_confidence
from kdkit.methods.ferkd.selfmix import cutmix_boxes, partner_slots, paste

__all__ = ["FerkdLoss", "FerkdMethod", "FerkdSpec", "SelfMixPartner", "calibrated_targets", "cutmix_boxes",
           "discarded", "ferkd_loss", "kept_views", "partner_slots", "paste", "soft_cross_entropy",
           "view_confidence"]
