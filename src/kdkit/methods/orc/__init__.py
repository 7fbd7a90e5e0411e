"""ORC (Choi, Cho, Cheung & Hwang, "ORC: Network Group-based Knowledge Distillation using Online Role Change",
ICCV 2023, arXiv:2206.01186; github.com/choijunyong/ORCKD holds a README only, no code).

The trained networks form two groups. The teacher group is a pre-trained *pivot teacher* plus the ``promote``
(paper: k = 1) best networks of the student group, re-chosen every step; the student group is everything else
(the deployed student and, in the paper, teacher assistants of intermediate size). One step on a batch ``(x, y)``:

1. ranking: each student-group network's cross-entropy on the batch (the paper evaluates it "before training, without
   updating"; here read from the step's own forward, the same logits); the lowest ``promote`` become temporary
   teachers (:func:`~kdkit.methods.orc.loss.promoted`);
2. intensive teaching: the students' error samples (misclassified by ``any`` student; :func:`feedback_mask`) are mixed
   into the batch, ``x~ = lam x + (1 - lam) x_f``, ``lam ~ Beta(alpha, alpha)``, and the pivot teacher learns
   ``lam CE(y, p(x~)) + (1 - lam) CE(y_f, p(x~))`` (:func:`intensive_loss`);
3. private teaching: a temporary teacher learns ``(1 - beta) CE + beta KD_T(., pivot)``;
4. group teaching: every other student learns ``(1 - beta) CE + beta (KD_T(., pivot) + KD_T(., temporary))``
   (``teaching: individual``, the paper's; ``mean`` distils the teachers' mean logits, its ensemble ablation).

A recipe gives the ``orc`` term (:class:`~kdkit.methods.orc.loss.OrcLoss`: steps 1, 3 and 4, reading every trained
network's logits, the pivot's last) and the ``orc:`` section (:mod:`~kdkit.methods.orc.method`: step 2, ``alpha`` and
``feedback``); the term without the section is the paper's ablation without intensive teaching (the pivot stays as
loaded).

What differs from the paper, or could not be verified (no code; the method section was read through two secondary
summaries of the paper, which give the losses above, k = 1 and the mixup of error samples):

* the four parts are one loss and one optimiser step (each network's parameters get only their own part, targets are
  detached), where the paper updates them one after the other, so here the temporary and group teaching read the
  pivot's logits from before this step's refinement;
* ``beta`` (0.5), ``T`` (4) and ``alpha`` (1) are not verified defaults; the exact rule that makes a sample an error
  sample (the summaries mention a softmax-based share) is not verified: ``any`` (default) or ``all`` students wrong;
* which student's partner: each sample's error-sample partner is drawn uniformly from the batch's error samples, and a
  batch without any error sample does not refine the pivot;
* the pivot teacher must be a peer with a ``checkpoint`` (pre-trained, as in the paper), trained with the group by
  the run's optimiser (its own ``peers.NAME.optimizer`` settings allowed).
"""

from kdkit.methods.orc.loss import (
                                    OrcBatch,
                                    OrcLoss,
                                    feedback_mask,
                                    group_loss,
                                    intensive_loss,
                                    mix_with_feedback,
                                    promoted,
                                    ranking_losses,
)
from kdkit.methods.orc.method import OrcMethod

__all__ = ["OrcBatch", "OrcLoss", "OrcMethod", "feedback_mask", "group_loss", "intensive_loss", "mix_with_feedback",
           "promoted", "ranking_losses"]
