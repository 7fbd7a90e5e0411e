"""WAD: weight-aware distillation for semi-supervised learning under class distribution mismatch (Du, Zhao, Sheng,
Li, Chen, "Semi-Supervised Learning via Weight-aware Distillation under Class Distribution Mismatch", ICCV 2023;
official code github.com/RUC-DWBI-ML/research, ``WAD-master``).

The unlabelled pool holds images of classes the labels never name. A frozen representation (the teacher's tap,
``penultimate`` by default) scores each unlabelled image against every known class by its nearest labelled image of
that class (cosine similarity); the most similar class is its pseudo-label and the margin between the two best
scores its weight, so an image close to one known class counts fully and one between classes (typically of an unseen
class) hardly at all. The student then learns ``CE(labelled) + mean_U w * CE(z, pseudo-label)``.

* :mod:`~kdkit.methods.wad.knowledge` -- class similarities, pseudo-labels and weights (official ``evals/eval.py``);
* :mod:`~kdkit.methods.wad.loss` -- the ``wad`` loss (official ``SSL/train/train.py``'s unlabelled term);
* :mod:`~kdkit.methods.wad.method` -- the checks and the computation of the tables before training.

Kept from the official code: the nearest-labelled-sample class score, the pseudo-label argmax, the weight
``s1 (1 - s2 / s1) = s1 - s2``, the mean of ``w * CE`` over the unlabelled batch added to the labelled CE. Differs:

* the representation is the teacher's penultimate feature, not a SimCLR/CSI contrastive model with shift transforms
  (kdkit has no self-supervised pre-training; the suite's teacher is supervised on the known classes);
* one round: the official code repeats training for ``split`` rounds, each moving the unlabelled images whose
  prediction agrees best with their pseudo-label (a decaying fraction) into the labelled set and the class axes; not
  implemented;
* kdkit's batches mix labelled and unlabelled samples in their share; the code draws one batch of each (Adam, 5e-4).

The paper text was read in its abstract only; the formulas follow the official code.
"""

from kdkit.methods.wad.knowledge import class_similarities, pseudo_labels_and_weights
from kdkit.methods.wad.loss import WadLoss, weighted_pseudo_label_ce
from kdkit.methods.wad.method import WadMethod

__all__ = ["WadLoss", "WadMethod", "class_similarities", "pseudo_labels_and_weights", "weighted_pseudo_label_ce"]
