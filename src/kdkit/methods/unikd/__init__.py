"""UniKD: universal knowledge distillation for object detectors ("UniKD: Universal
Knowledge Distillation for Mimicking Homogeneous or Heterogeneous Object Detectors", ICCV 2023).

Feature imitation fails between heterogeneous detectors (different heads, assignments, architectures: the features
mean different things). UniKD distils through *knowledge embeddings* instead: an extra decoder head with a fixed set
of learnt queries and deformable cross-attention, the Adaptive Knowledge Extractor (AKE,
:class:`~kdkit.methods.unikd.ake.AdaptiveKnowledgeExtractor`), reads a detector's FPN levels.

1. **Pretraining** (:mod:`~kdkit.methods.unikd.pretrain`, the phase of
   :class:`~kdkit.methods.unikd.method.UniKDMethod`): the AKE is trained on the frozen teacher's features to predict
   the teacher's output (its decoded detections, by Deformable DETR's Hungarian set loss), which infuses the
   teacher's content and positional knowledge into the queries.
2. **Distillation** (loss ``unikd``, :class:`~kdkit.methods.unikd.loss.UniKDLoss`): the AKE is frozen and also
   reads the student's levels (through 1x1 adapters when the widths differ); the student is trained so that its
   content and positional embeddings match those the AKE extracts from the teacher
   (:func:`~kdkit.methods.unikd.loss.knowledge_loss`), beside its own detection loss.

What was read and what is reconstructed: no official code is public (searched by title and name; a repository named
UniKD is a different, DETR distillation project), and of the paper only the abstract could be read here. It gives
the structure above (AKE = decoder heads with deformable cross-attention; pretrained on the teacher's output;
content and positional knowledge in a fixed-number set of knowledge embeddings; frozen AKE attached to the student).
Below that level everything is kdkit's reconstruction, in Deformable DETR's terms:

* the AKE's layout (DAB-DETR box queries, ``layers`` decoder layers with iterative box refinement, a shared
  positional MLP of the boxes' sine embedding) and its sizes (20 queries, 2 layers, width 32, 4 heads, 4 points);
* the pretraining targets (the teacher's detections above a score of 0.45, after NMS: with the scenes' teacher about
  as many per image as there are objects, 3.1 vs 2.4; 0.3 gave 14 and a worse AKE) and loss (Deformable DETR's:
  Hungarian matching, focal/L1/GIoU weighted 2/5/2, summed over the layers; AdamW, gradient norm clipped at 0.1),
  for ``pretrain_epochs`` (4) of the training set at lr 2e-3 with a cosine decay;
* the "positional embedding" distilled: the positional MLP of each layer's refined boxes (the content embedding is
  the layer's output); the distance (mean squared error, both weighted 1, averaged over the layers);
* the adapters (one 1x1 conv per level, student to teacher width, trained with the student).

On the detection suite's small detectors the term's weight is set in the recipe (``recipes/scenes_det/unikd.yaml``).
One seed there (2,000 scenes, 8 epochs): labels only 8.67 mAP, UniKD from the det_teacher (26.2 mAP) 8.79, from the
heterogeneous torchvision FCOS teacher (23.2 mAP, ``unikd_hetero.yaml``) 8.97 -- one seed each, so no gain is shown;
with pretraining targets above 0.3 (14 per image) the AKE fit worse and the student fell to 7.71.
"""

from kdkit.methods.unikd.ake import AdaptiveKnowledgeExtractor, Knowledge, sine_embedding
from kdkit.methods.unikd.deform import DeformableAttention, deformable_sample
from kdkit.methods.unikd.loss import UniKDLoss, knowledge_loss
from kdkit.methods.unikd.method import UniKDMethod, UniKDSpec
from kdkit.methods.unikd.pretrain import match, set_loss, teacher_detections

__all__ = ["AdaptiveKnowledgeExtractor", "DeformableAttention", "Knowledge", "UniKDLoss", "UniKDMethod", "UniKDSpec",
           "deformable_sample", "knowledge_loss", "match", "set_loss", "sine_embedding", "teacher_detections"]
