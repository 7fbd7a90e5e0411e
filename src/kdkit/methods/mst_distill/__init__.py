"""MST-Distill (Li, Yang, Chen, Dong, Chen & Wang, "MST-Distill: Mixture of Specialized Teachers for Cross-Modal
Knowledge Distillation", ACM MM 2025; arXiv 2507.07015; official code github.com/Gray-OREO/MST-Distill): a student
of one modality distils a mixture of teachers -- multimodal and cross-modal ones -- each made *specialised* by a
masking module, and an instance-level routing network (gate) picks each sample's teachers.

* :mod:`~kdkit.methods.mst_distill.modules` -- the masking module (the code's ``MaskNet_2d``: a per-channel soft
  mask of a teacher's feature map from self-attention over its channels) and the gate (``GateNet``: two linear
  layers on the student's logits);
* :mod:`~kdkit.methods.mst_distill.loss` -- the ``mst_distill`` loss: warm-up KD from every teacher, then top-k
  routed KD (T=4) plus the gate's load-balancing loss;
* :mod:`~kdkit.methods.mst_distill.method` -- the method: the masking phase, the stage switch, refusals.

The three stages of the official ``main-MST-Distill.py`` and what kdkit keeps of them:

1. *co-training* (1 epoch): teachers, auxiliary teacher and student train together (CE + mutual KL). kdkit's
   teachers are trained beforehand by their own recipes and stay frozen, so stage 1 here is ``route_epoch``
   epochs of the student's CE + the sum of KDs from every unmasked teacher (the student's side of the code's loss).
2. *masking* (1 epoch, Adam 1e-4 per mask): each mask learns to make its masked teacher's prediction match the
   frozen student's (``T^2 KL(p_s || p_masked)``, T=4); the code keeps the masks of the best validation loss --
   kdkit has no validation split and keeps the last.
3. *routed distillation*: student and gate (Adam 1e-4 in the code; the recipe's optimiser here) learn from CE +
   KD of each sample's top-1 masked teacher + the load balance ``KL(uniform || mean routing)``; the selection is an
   index, so the gate learns from the load balance alone, as in the code (``routing: weighted``, the code's
   ``weighted_MTGdistillation``, routes by the gate's probabilities with gradient).

Other differences: the code masks two layers of each of its two networks (four specialised teachers); here each
teacher is masked at its last feature map (the map its linear classifier reads; one specialised teacher per
teacher, so more teachers make more ways); the masks see the map the frozen teacher computed, so only that map's
downstream classifier is re-run.
"""

from kdkit.methods.mst_distill.loss import (
    MstDistillLoss,
    kd_per_sample,
    load_balance,
    masked_logits,
    topk_routed_kd,
    weighted_routed_kd,
)
from kdkit.methods.mst_distill.method import MstDistillMethod, MstDistillSpec
from kdkit.methods.mst_distill.modules import GateNet, MaskNet

__all__ = ["GateNet", "MaskNet", "MstDistillLoss", "MstDistillMethod", "MstDistillSpec", "kd_per_sample",
           "load_balance", "masked_logits", "topk_routed_kd", "weighted_routed_kd"]
