"""The CIFAR knowledge-distillation model zoo (CRD / RepDistiller and mdistiller architectures).

Importing this package registers every model: ``resnet8`` ... ``resnet110``, ``resnet8x4``, ``resnet32x4``,
``wrn_16_1``, ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2``, ``vgg8`` ... ``vgg19``, ``mobilenetv2``,
``shufflenetv1`` and ``shufflenetv2``.
"""

from __future__ import annotations

from kdkit.models.cifar import mobilenetv2, resnet, shufflenet, vgg, wrn

__all__ = ["mobilenetv2", "resnet", "shufflenet", "vgg", "wrn"]
