"""SSLD, label-free distillation (Cui et al., "Beyond Self-Supervision: A Simple Yet Effective Network Distillation
Alternative to Improve Backbones", 2021; code: PaddleClas, Paddle): the student is trained to make its prediction
consistent with the teacher's and with nothing else -- no hard labels -- so extra unlabelled images teach exactly like
labelled ones.

* :mod:`~kdkit.methods.ssld.loss` -- the ``ssld`` loss: the JS divergence of the two softmaxes at T = 1 (PaddleClas's
  SSLD loss; ``divergence: soft_ce`` is the soft cross-entropy it improved on);
* :mod:`~kdkit.methods.ssld.method` -- the rules: ``train.ce_weight: 0`` (the paper drops the hard-label loss), a
  teacher, the ``ssld`` term alone.

Kept: logits only (the paper distils predictions, not features), no labels, unlabelled data used like labelled data.
Not kept: the paper's ImageNet-22k mining of extra images (the semi-supervised setting's unlabelled images play that
part) and its final fine-tuning on the labelled set (a second recipe, not part of the objective).
"""

from kdkit.methods.ssld.loss import SSLDLoss, ssld_loss
from kdkit.methods.ssld.method import SSLDMethod

__all__ = ["SSLDLoss", "SSLDMethod", "ssld_loss"]
