"""WAD: weight-aware distillation for semi-supervised learning under class distribution mismatch (Du, Zhao, Sheng,
Li, Chen, "Semi-Supervised Learning via Weight-aware Distillation under Class Distribution Mismatch", ICCV 2023;
official code github.com/RUC-DWBI-ML/research, ``WAD-master``).

The unlabelled pool holds images of classes the labels never name. A frozen representation scores each unlabelled
image against every known class by its nearest labelled image of that class (cosine similarity); the most similar
class is its pseudo-label and the margin between the two best scores its weight, so an image close to one known
class counts fully and one between classes (typically of an unseen class) hardly at all. The student then learns
``CE(labelled) + mean_U w * CE(z, pseudo-label)``. The representation is, by the term's ``representation``:

* ``contrastive`` (the paper's): a SimCLR network trained first on the labelled and unlabelled images without labels
  (:mod:`~kdkit.methods.wad.contrastive`; the recipe's ``wad.contrastive`` section), read at its projection head;
  no teacher is needed;
* ``teacher`` (the default, kdkit's addition): the teacher tap the term names (``penultimate``).

* :mod:`~kdkit.methods.wad.knowledge` -- class similarities, pseudo-labels and weights (official ``evals/eval.py``);
* :mod:`~kdkit.methods.wad.contrastive` -- SimCLR and its NT-Xent (official ``contrast/``);
* :mod:`~kdkit.methods.wad.loss` -- the ``wad`` loss (official ``SSL/train/train.py``'s unlabelled term);
* :mod:`~kdkit.methods.wad.rounds` -- the official rounds: confident unlabelled samples join the labelled set;
* :mod:`~kdkit.methods.wad.method` -- the checks, the tables before training and the rounds' phase.

Kept from the official code: SimCLR's views, projection head, NT-Xent (T 0.5) and optimiser, the
nearest-labelled-sample class score, the pseudo-label argmax, the weight ``s1 (1 - s2 / s1) = s1 - s2``, the mean of
``w * CE`` over the unlabelled batch added to the labelled CE, and (``wad.rounds``) the ``split + 1`` rounds with
their ``alpha (1 - i / split)^2`` promotion schedule. The official commands run with ``--shift_trans_type none``
(no CSI rotation or cut-permutation shift: one shift), as kdkit does. Differs:

* SimCLR runs for a CPU budget (40 epochs of a small CNN in the shipped recipe; the code: 1,500 of a ResNet-18); the
  features are read on one un-augmented view (the code reads one randomly augmented view);
* ``wad.rounds`` defaults to 1 (a recipe with few epochs stays valid); the paper's work uses split 5, i.e.
  ``rounds: 6`` (``recipes/class_mismatch/wad_rounds.yaml``), the rounds sharing the run's epochs instead of each
  training for the full budget;
* kdkit's batches mix labelled and unlabelled samples in their share; the code draws one batch of each (Adam, 5e-4).

The paper text was read in its abstract only; the formulas follow the official code.
"""

from kdkit.methods.wad.contrastive import ContrastiveSpec, nt_xent
from kdkit.methods.wad.knowledge import class_similarities, pseudo_labels_and_weights
from kdkit.methods.wad.loss import WadLoss, weighted_pseudo_label_ce
from kdkit.methods.wad.method import WadMethod

__all__ = ["ContrastiveSpec", "WadLoss", "WadMethod", "class_similarities", "nt_xent", "pseudo_labels_and_weights",
           "weighted_pseudo_label_ce"]
