"""CTCL: CNN-Transformer collaborative learning (Zhu, Luo, Zheng, Wang & Wang, "A Good Student is Cooperative and
Reliable: CNN-Transformer Collaborative Learning for Semantic Segmentation", ICCV 2023, arXiv:2307.12574).

A CNN and a ViT segmenter are trained together from scratch (online distillation), each from the labels and from
the other, and either can be deployed. Three terms, each reading both networks (``student: [A..., B...]``):

* HFD (:func:`~kdkit.methods.ctcl.loss.hfd_loss`, loss ``hfd``): the low-layer features of each network mimic the
  other's, through learnt 1x1 projections, both on the coarser of the two grids;
* region-wise BSD (:func:`~kdkit.methods.ctcl.loss.region_bsd_loss`, ``region_bsd``): the high-level feature maps
  are split into ``R x R`` regions; in each, the network with the lower mean cross-entropy there teaches the other
  its (projected) features: the direction of transfer is decided region by region;
* pixel-wise BSD (:func:`~kdkit.methods.ctcl.loss.pixel_bsd_loss`, ``pixel_bsd``): at each pixel, the network with
  the lower cross-entropy teaches the other its class distribution (``T^2 KL``, target detached).

What was read and what is reconstructed: no official code is public (searched by title and the authors' lab);
of the paper, only the abstract and introduction could be read here, which name the three parts and what each
decides (HFD: "mimicking heterogeneous features" in the low-layer feature space; region-wise BSD: "the directions
of knowledge transferred between the corresponding regions in the feature space"; pixel-wise BSD: "which of the
prediction knowledge to be transferred in the logit space"). Every formula below that sentence level is kdkit's:
the reliability criterion (cross-entropy with the labels: lower teaches; ``pixel_bsd``'s ``rule: correct`` also
asks the teacher to be right), the distances (squared distance of L2-normalised channel vectors, ``normalize``;
KL at ``T = 1``), the projections (1x1 convolutions learnt with the networks), the pooling of both maps to the
coarser grid, ``R = 4`` regions per side, which layers are "low" and "high" (the recipe's taps), and the weights.
The paper's students (DeepLabV3+ ResNet-18 and SegFormer MiT-B0 on Cityscapes-scale data) are replaced by a
~22k-parameter U-Net CNN (``segnet_student``) and a ~25k-parameter timm ``VisionTransformer`` segmenter
(``vit_seg_student``).
"""

from kdkit.methods.ctcl.loss import (
                                     HfdLoss,
                                     PixelBsdLoss,
                                     RegionBsdLoss,
                                     hfd_loss,
                                     mimic_map,
                                     pixel_bsd_loss,
                                     pixel_teachers,
                                     region_bsd_loss,
                                     region_teachers,
)
from kdkit.methods.ctcl.method import CtclMethod, is_vit

__all__ = ["CtclMethod", "HfdLoss", "PixelBsdLoss", "RegionBsdLoss", "hfd_loss", "is_vit", "mimic_map",
           "pixel_bsd_loss", "pixel_teachers", "region_bsd_loss", "region_teachers"]
