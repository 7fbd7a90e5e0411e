"""Be Your Own Teacher (Zhang, Song, Gao, Chen, Bao, Ma, "Be Your Own Teacher: Improve the Performance of
Convolutional Neural Networks via Self Distillation", ICCV 2019): self-distillation with no external teacher.

Shallow classifiers (a bottleneck and a linear layer, the ``byot_head`` bridge) read intermediate taps of the student
itself; each learns from the labels, from the deepest classifier's softened output and from the deepest feature::

    L_i = (1 - alpha) CE(q_i, y) + alpha T^2 KL(q_C^T || q_i^T) + lambda ||F_i - F_C||^2

(``q_C`` and ``F_C``, the model's own logits and the feature its classifier reads, are targets: detached). The
deepest classifier is the model's own, trained by the objective's cross-entropy (``train.ce_weight``: ``1 - alpha``,
as the paper's sum over every classifier, ``i = C`` included). The heads are training-only: the deployed network is
the plain model.

* :mod:`~kdkit.methods.byot.head` -- the ``byot_head`` bridge;
* :mod:`~kdkit.methods.byot.loss` -- the ``byot`` loss;
* :mod:`~kdkit.methods.byot.method` -- the method's checks.

The paper's authors released no code; the reference here is the paper's equations and the widely used
re-implementation github.com/luanyunteng/pytorch-be-your-own-teacher (``train.py``, ``models/resnet.py``). Where the
two differ (the default is named first):

* the hint: the squared L2 distance per sample, averaged over the batch (``hint: l2``, the paper's
  ``||F_i - F_C||_2^2``); the re-implementation sums ``(F_i - F_C)^2`` over the batch and the elements where either
  feature is positive (``hint: masked_sum``);
* the distillation term: KL (0 when the head matches; the re-implementation's soft cross-entropy differs from it by
  the target's entropy, a constant for the head: same gradients), with the ``T^2`` factor of both;
* the bottleneck: the re-implementation's ``branchBottleNeck`` (1x1 conv to a quarter of the deep feature's channels,
  a k x k stride-k conv down to the deep feature's resolution, 1x1 conv up; BN and ReLU after each), then a global
  average pool when the deep feature is a vector (its ResNets) or a flatten when it is a map (kdkit's flatten-head
  CNNs, whose classifier reads the flattened map).

Defaults: ``alpha`` 0.1 and ``T`` 3 are the re-implementation's (``--alpha``, ``--temperature``); ``hint_weight``
1e-4 is chosen here for the per-sample ``l2`` hint (the re-implementation's ``--beta`` 1e-6 weighs its batch sum).
"""

from kdkit.methods.byot.head import ByotHead, byot_head
from kdkit.methods.byot.loss import ByotLoss, byot_loss
from kdkit.methods.byot.method import ByotMethod

__all__ = ["ByotHead", "ByotLoss", "ByotMethod", "byot_head", "byot_loss"]
