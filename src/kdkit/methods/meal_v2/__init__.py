"""MEAL V2 (Shen & Savvides, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet without
Tricks", 2020; code: github.com/szq0214/MEAL-V2): ensemble distillation whose only supervision is the average of
several teachers' softmax outputs, plus a discriminator on the final outputs.

* the similarity loss is ``multi_teacher_kd`` at temperature 1: ``KL(p_bar || p_s)`` with ``p_bar`` the mean of the
  teachers' softmaxes. The official ``KLLoss`` is the soft cross-entropy ``-sum p_bar log p_s``, which differs from
  the KL only by the teachers' entropy (constant for the student): same gradients, a value 0 when the student
  matches;
* :mod:`~kdkit.methods.meal_v2.loss` -- the ``meal_v2_discriminator`` loss: a small MLP (a loss head: trained by
  the run's optimiser with the student, checkpointed with the objective, never part of the deployed network) that
  tells the teachers' output from the student's;
* :mod:`~kdkit.methods.meal_v2.method` -- the method: no hard labels (``train.ce_weight: 0``), at least one teacher,
  a similarity term.

Where the paper and the official code differ (the default is named first):

* Training of the student against the discriminator: the paper's adversarial game (``objective: adversarial``:
  the discriminator minimises its binary cross-entropy, the student minimises the fooling loss, BCE of its output
  classified as the teachers'); the code adds the discriminator's BCE to the loss and minimises the sum over student
  and discriminator alike (``objective: joint``, ``train.py``: one backward, one optimiser), so its student helps the
  discriminator rather than fooling it.
* What the discriminator reads: probabilities (``inputs: probabilities``, the paper's "final outputs", the student's
  softmax against the teachers' averaged softmax); the code feeds the student's logits and the mean of the teachers'
  logits (``inputs: logits``).
* The discriminator: three linear layers (the code's 1x1 convolutions on a ``(B, K, 1, 1)`` input) with ReLUs;
  the code narrows by ``K // 8`` twice (1000 -> 125 -> 15 -> 2), which leaves no unit for 10 classes, so the widths
  here are ``hidden`` and ``hidden`` (default 64); the code also applies a ReLU to its two output logits
  (``final_relu: true``; default false: a clipped logit cannot push a probability below 0.5).
* The discriminator's learning rate: the code's ``--d_lr`` 1e-4 is overwritten by its schedule
  (``_set_learning_rate`` sets every group), so its discriminator trains at the student's rate, as here.
* Weight decay: the code's default is 0 (``--weight-decay 0``); the shipped recipe removes it with
  ``train.optimizer.weight_decay: 0``.
"""

from kdkit.methods.meal_v2.loss import Discriminator, MealV2DiscriminatorLoss, meal_v2_discriminator_loss
from kdkit.methods.meal_v2.method import MealV2Method

__all__ = ["Discriminator", "MealV2DiscriminatorLoss", "MealV2Method", "meal_v2_discriminator_loss"]
