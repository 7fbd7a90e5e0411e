"""LELP: Learning Embedding Linear Projections (Loo, Iliopoulos, Hu, Vee, "Linear Projections of Teacher Embeddings
for Few-Class Distillation", arXiv 2409.20449, 2024).

With few classes the teacher's logits carry little (a binary teacher gives one number per sample). LELP reads its
embedding instead: before training, one pass of the frozen teacher over the training images; per class, the
embeddings are projected onto the null space of the teacher's output weights and their top ``S`` principal
directions are found, then randomly rotated. Each class is split into ``S`` pseudo-subclasses whose probabilities
are the teacher's class probability times a softmax (temperature beta) of the sample's coordinates along them; the
student's output layer is widened to ``C * S`` logits and trained on these ``C * S`` targets, and predicts a class by
summing its subclasses' probabilities.

* :mod:`~kdkit.methods.lelp.projection` -- the projections (null space, per-class PCA, rotation; pure functions);
* :mod:`~kdkit.methods.lelp.head` -- the ``lelp_head`` bridge (the student's ``C * S`` output layer, deployed);
* :mod:`~kdkit.methods.lelp.loss` -- the ``lelp`` loss (KL of the pseudo-subclass targets to the student's softmax);
* :mod:`~kdkit.methods.lelp.method` -- the method: checks, the teacher pass before training, ``summary.json``.

What the paper fixes and what kdkit chose (no official code was found; the paper's main text and its reviews were
read, not its appendix):

* Embeddings: the teacher's final-layer embedding (the input of its output layer, tap ``penultimate``), on the
  un-augmented training images, once before training, grouped by their labels (unlabelled samples are left out).
* Null-space projection and random rotation: both on (``null_space``, ``rotate``), as the paper's method; each can
  be turned off (the paper's ablations). One Haar-random rotation per class, seeded by ``train.seed``.
* Coordinates: the PCA coordinates ``V_c^T (h - mu_c)`` (centred on the class mean); the paper does not say
  whether it centres.
* Loss: the paper's unified cross-entropy over ``C * S`` targets, written as a KL (same gradient); ``tau`` softens
  the teacher's class probabilities only (the student's softmax has none, so the class probability it is trained on
  is the one deployed). ``tau = 1``, ``beta = 1``, ``S = 4`` are defaults, not the paper's (it tunes them per task);
  ``beta`` is in the embedding's units, so the run's ``summary.json`` gives each direction's spread.
* ``alpha`` (``train.ce_weight``) = 0 in the paper's experiments, for every method; kdkit accepts any.
* Many classes: the paper expects no gain there (its limitations) but does not forbid it; kdkit does not refuse.
"""

from kdkit.methods.lelp.head import LelpHead, class_logits, lelp_head
from kdkit.methods.lelp.loss import LelpLoss, lelp_loss, subclass_targets
from kdkit.methods.lelp.method import LelpMethod
from kdkit.methods.lelp.projection import Projections, coordinates, lelp_projections, random_rotation

__all__ = ["LelpHead", "LelpLoss", "LelpMethod", "Projections", "class_logits", "coordinates", "lelp_head",
           "lelp_loss", "lelp_projections", "random_rotation", "subclass_targets"]
