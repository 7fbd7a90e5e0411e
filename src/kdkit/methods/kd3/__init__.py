"""KD³ (Tang, Chen, Niu, Sugiyama & Gong, "Distribution Shift Matters for Knowledge Distillation with Webly
Collected Images", ICCV 2023; arXiv 2307.11469): distil a teacher trained on data that is withheld into a student
that only sees unlabelled web images of another distribution (kdkit's ``shifted`` setting stands in for them).

Three components, as the paper's abstract states them:

* teacher-student dynamic instance selection: useful web instances are selected from the *combined* predictions
  of teacher and student (:func:`~kdkit.methods.kd3.loss.select_instances`), recomputed at every step; the
  student distils the teacher on them (:func:`~kdkit.methods.kd3.loss.selected_kd`);
* knowledge memorisation: the weighted features (:func:`~kdkit.methods.kd3.loss.weighted_feature_alignment`) and
  the classifier parameters (:func:`~kdkit.methods.kd3.loss.classifier_alignment`) of the two networks are aligned;
* MixDistribution: perturbed data with a new distribution (:func:`~kdkit.methods.kd3.mix.mix_distribution`, each
  image re-styled with channel statistics mixed with another instance's) and a contrastive instance alignment
  (:func:`~kdkit.methods.kd3.loss.mix_contrast`) towards distribution-invariant representations.

What is not the paper's: its method section (the exact selection rule, weights, where MixDistribution sits in the
network, loss weights and temperatures) could not be read for this implementation -- only the abstract; no official
code was found. The formulas here are one faithful reading of the abstract, each documented where it is defined,
and every choice is a parameter: ``teacher_weight`` 0.5 and ``threshold`` 0.5 for the selection, KD at T=4, the
three alignment weights 1, InfoNCE at 0.1, MixDistribution at the input with ``Beta(0.1, 0.1)`` (MixStyle's
mixing distribution); none of these defaults is claimed to be the paper's.
"""

from kdkit.methods.kd3.loss import (
                                    Kd3Loss,
                                    classifier_alignment,
                                    mix_contrast,
                                    select_instances,
                                    selected_kd,
                                    weighted_feature_alignment,
)
from kdkit.methods.kd3.method import Kd3Method
from kdkit.methods.kd3.mix import draw_mix, mix_distribution

__all__ = ["Kd3Loss", "Kd3Method", "classifier_alignment", "draw_mix", "mix_contrast", "mix_distribution",
           "select_instances", "selected_kd", "weighted_feature_alignment"]
