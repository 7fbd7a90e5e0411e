"""DistillNearest and DistillWeighted (Borup, Phoo & Hariharan, "Distilling from Similar Tasks for Transfer Learning on
a Budget", ICCV 2023; no official code released): several frozen source models, scored once before training by a
task-similarity measure on the target's labelled training images, then distilled into the student with their
pseudo-labels on the target's (mostly unlabelled) training images.

* :mod:`~kdkit.methods.source_select.similarity` -- the score (GBC, the Gaussian Bhattacharyya coefficient of the
  source's features of the labelled images, Pándy et al. CVPR 2022: how little the target classes overlap in the
  source's feature space), the selection (``nearest``: the best source alone) or weights (``weighted``:
  ``softmax(score / temperature)``), and each source's target head (a linear classifier on its frozen feature, fitted
  on the labelled images: the bridge from a source's own label space to the target's classes);
* :mod:`~kdkit.methods.source_select.loss` -- the ``source_kd`` loss: ``T^2 sum_s alpha_s KL(p_s || p_student)``,
  one KD term per source through its target head;
* :mod:`~kdkit.methods.source_select.method` -- the ``source_select:`` section: refusals, the plan-time scoring and
  fitting (frozen sources, unaugmented labelled *training* images, never the test split) and the scores and weights
  in ``summary.json`` (``source_select``) and the report.

What is kept from the paper and what is not (the stored copies of the paper available here held its abstract, which
fixes the structure: "task similarity metrics to select a single suitable source model" (DistillNearest), "multiple
source models ... weighted by their relevance for the target task" (DistillWeighted), "no access to source data, and
merely need features and pseudo-labels of the source models"; the details below are kdkit's choices):

* the similarity is GBC, a feature-based transferability measure that needs only the source's features and the
  target labels (no source data); the paper compares several such measures;
* the weights are a softmax of the scores at ``temperature`` (default 1), recorded in ``summary.json``;
* the pseudo-labels are the target heads' soft predictions (``head: probe``, default); ``head: source`` uses the
  sources' own logits, which needs the target's label space;
* the objective is ``train.ce_weight`` x CE on the labelled images + the term's weight x ``source_kd`` on every
  image; no feature-regression term.

Scope: kdkit builds every teacher with the run's classes, so a source trained on another number of classes cannot be
loaded yet (its weights' shapes differ: refused with exit code 2 when the weights are loaded); the target head is
nevertheless what makes a source's pseudo-labels the target's, whatever its own classifier learnt.
"""

from kdkit.methods.source_select.loss import SourceKDLoss, source_kd_loss
from kdkit.methods.source_select.method import SourceSelectMethod, SourceSelectSpec
from kdkit.methods.source_select.similarity import (
    bhattacharyya_coefficients,
    class_gaussians,
    fit_target_head,
    gbc_score,
    pca_project,
    selection_weights,
)

__all__ = ["SourceKDLoss", "SourceSelectMethod", "SourceSelectSpec", "bhattacharyya_coefficients", "class_gaussians",
           "fit_target_head", "gbc_score", "pca_project", "selection_weights", "source_kd_loss"]
