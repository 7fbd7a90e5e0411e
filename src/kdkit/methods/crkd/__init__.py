"""Cr-KD: class-relation knowledge distillation for novel class discovery (Gu, Zhang, Xu, He, ICCV 2023; official
code github.com/kleinzcy/Cr-KD-NCD, ``rKD.py`` and ``model/losses.py``).

A model trained on the known classes (the teacher) sees the unlabelled images of the novel classes; its distribution
over the known classes is each novel sample's *class relation*. The student discovers the novel classes with UNO's
objective and keeps those class relations on its known-class outputs, weighted per sample:

* :mod:`~kdkit.methods.crkd.swap` -- ``ncd_swap``: UNO's swapped prediction with Sinkhorn-Knopp pseudo-labels, the
  base objective (with the engine's cross-entropy on the labelled known-class images);
* :mod:`~kdkit.methods.crkd.loss` -- ``crkd``: the weighted class-relation KD;
* :mod:`~kdkit.methods.crkd.method` -- the checks (``novel_classes`` data, two views, ``known`` = the data's).

Kept from the official code: the soft cross-entropy with ``T^2`` (T=4), the weight ``w = sum_known softmax(z_s/(tau
T))`` normalised by its batch mean with the gradient flowing through it (``weighting: learnable``; ``detached`` and
``none`` for ablations), KD on both views, Sinkhorn (3 rounds) on the novel logits of one view as the other view's
target over every class, the KD weight 0.1 (``alpha``). Where kdkit differs (the recipes' comments repeat it):

* logits: the official model has cosine-classifier heads (normalised prototypes) divided by 0.1; kdkit's models end
  in a linear layer, so ``tau``, the swap ``temperature`` and Sinkhorn's ``epsilon`` are parameters (official 0.1,
  0.1, 0.05 are their defaults; the shipped recipes use 1, 1, 0.5 for linear logits);
* one head: UNO's 4 novel heads on an MLP projector with best-head selection and over-clustering heads are left out;
  the model's own classifier has the novel slots;
* the labelled samples' cross-entropy is the engine's mean over the labelled samples, the swap term's the mean over
  the unlabelled ones (UNO averages one loss over the mixed batch);
* the two views are kdkit's ``[weak; strong]`` (crop/flip, then RandAugment) instead of two multi-crop large crops;
* the student starts from scratch (and can be smaller) instead of from the known-class model's weights.

The paper text was read in its abstract only; the formulas follow the official code.
"""

from kdkit.methods.crkd.loss import CrKdLoss, class_relation_kd
from kdkit.methods.crkd.method import CrKdMethod
from kdkit.methods.crkd.sinkhorn import sinkhorn_knopp
from kdkit.methods.crkd.swap import NcdSwapLoss, swapped_prediction_loss

__all__ = ["CrKdLoss", "CrKdMethod", "NcdSwapLoss", "class_relation_kd", "sinkhorn_knopp", "swapped_prediction_loss"]
