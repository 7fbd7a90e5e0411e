"""DHO: Dual-Head Optimization (Kang, Lee, Jang, Hwang, "Simple Semi-supervised Knowledge Distillation from
Vision-Language Models via Dual-Head Optimization", arXiv 2505.07675, 2025; code: github.com/erjui/DHO).

Two linear heads on one shared feature: the CE head (the model's own classifier) learns from the labels, the KD
head (the ``dho_head`` bridge) from the teacher's predictions on labelled and unlabelled samples; the deployed
prediction combines them, ``alpha * softmax(h_CE) + (1 - alpha) * softmax(h_KD / beta)``.

* :mod:`~kdkit.methods.dho.head` -- the ``dho_head`` bridge (the KD head; part of the deployed network);
* :mod:`~kdkit.methods.dho.loss` -- the ``dho`` loss (the KD term);
* :mod:`~kdkit.methods.dho.method` -- the method: its checks and the heads' accuracies in ``summary.json``.

Where the paper and the official code differ (the default is named first):

* KD average: the paper's one mean over labelled and unlabelled samples (``average: union``); the code adds the mean
  over a labelled batch and the mean over an unlabelled batch (``average: split``).
* Loss weights: the paper's ``lambda L_CE + (1 - lambda) L_KD`` (``train.ce_weight`` and the term's weight; 0.5 each
  in the shipped recipe, as ``train_others.py``); ``train_imgnet_semi.py`` uses ``L_CE + L_KD`` (weights 1 and 1).
* Inference: alpha 0.5 and beta 1 (the KD head's plain softmax) fixed in the recipe (``bridge_params``); the
  ImageNet script fixes alpha 0.5, beta 0.5, and the few-shot script searches both on a validation split every
  epoch (not implemented: kdkit has no validation split; ``summary.json`` reports the test accuracy for each alpha,
  for analysis only).
* Temperature: 2 with the ``T^2`` factor, the code's (``temperature``).

Not taken from the code: its separate labelled and unlabelled loaders of equal batch size. kdkit's batches are
drawn from labelled and unlabelled samples together (labelled ones in their share of the training set), and the
cross-entropy averages over the batch's labelled samples.
"""

from kdkit.methods.dho.head import DhoHead, combine_heads, dho_head
from kdkit.methods.dho.loss import DhoLoss, dho_kd_loss
from kdkit.methods.dho.method import DhoMethod

__all__ = ["DhoHead", "DhoLoss", "DhoMethod", "combine_heads", "dho_head", "dho_kd_loss"]
