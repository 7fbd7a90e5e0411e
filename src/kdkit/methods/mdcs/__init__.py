"""MDCS (Zhao, Jiang, Hu, Zhang, Liu, "MDCS: More Diverse Experts with Consistency Self-distillation for Long-tailed
Recognition", ICCV 2023; official code github.com/fistyee/MDCS): self-distillation of a multi-expert network.

Several experts (``mdcs_experts``: classifier heads on one shared student feature) are trained with

* the **diversity loss**: each expert's cross-entropy on its logits shifted by ``lambda_k log(pi)`` (``pi`` the
  training labels' class prior, computed from the run's data: the setting's, after ``data.subset``), so each expert
  leans towards the head (``lambda < 0``), a uniform prior (1) or the tail (``> 1``);
* **consistency self-distillation**: on the **confident instances** (the weak view's prediction is the label), the
  weak view's prediction is the target (detached) of the strong view's, by KL, with weight ``alpha`` ramped up
  linearly over the first epochs.

Batches are ``[weak; strong]`` views of the same images (``data.views: 2``: kdkit's crop/flip view and the same
plus RandAugment); both views' cross-entropies count. Deployed: the experts' mean raw logits, the code's
``final_out`` (the paper's "aggregate the experts"; the shifts are training-only).

* :mod:`~kdkit.methods.mdcs.head` -- the ``mdcs_experts`` bridge (deployed);
* :mod:`~kdkit.methods.mdcs.loss` -- the ``mdcs`` loss (diversity + consistency);
* :mod:`~kdkit.methods.mdcs.method` -- the checks, the prior and the ramp installed on the loss, per-expert accuracy.

Formulas and defaults follow the official code (``model/loss.py: MDCSLoss``,
``configs/config_cifar100_ir100_mdcs.json``, ``model/ldam_drw_resnets/expert_resnet_cifar.py``); the paper's full
text could not be read when this was written (only its abstract). Where the code and the task's description
(``methods.md``) may differ, both are parameters (default first):

* consistency pairing: per expert, each expert's weak view distils its own strong view, with each expert's own
  confident instances (``pairing: expert``, the code's); or the weak view's deployed (mean) prediction distils the
  strong view's, on the instances it classifies right (``pairing: ensemble``);
* ``lambdas`` ``(-0.5, 1, 2.5)``, ``alpha`` 0.6, warm-up ``min(epoch / 20, 1)``, ``T`` 1: the code's (its config's
  ``tau: 2`` is stored and never used). The code's prior is the class counts plus ``1e-9`` inside the log; the
  normalised prior used here differs by a constant per row, which no softmax sees.
* experts: the code's experts own the backbone's last two stages (RIDE's layout) and a cosine classifier times 30;
  here they are heads on one feature (``classifier: cosine``, ``scale: 30``), optionally with an expert-own hidden
  layer (``hidden``), since a bridge cannot split a registered model.

Not taken from the code: its ``per_cls_weights`` (computed, never applied to MDCSLoss's cross-entropies) and DINO-style
centres (declared, unused).
"""

from kdkit.methods.mdcs.head import CosineClassifier, MdcsExperts, mdcs_experts
from kdkit.methods.mdcs.loss import MdcsLoss, confident, consistency_loss, diversity_loss, mdcs_loss, shifted_logits
from kdkit.methods.mdcs.method import MdcsMethod, class_counts

__all__ = ["CosineClassifier", "MdcsExperts", "MdcsLoss", "MdcsMethod", "class_counts",
           "confident", "consistency_loss", "diversity_loss", "mdcs_experts", "mdcs_loss", "shifted_logits"]
