"""Segmentation networks: a small built-in encoder-decoder pair, and torchvision's segmenters by name.

Every network here outputs per-pixel logits ``(B, num_classes, H, W)`` at the input's resolution (for the
``segmentation`` task, ``num_classes`` counts background: :meth:`kdkit.tasks.segmentation.Segmentation.outputs`).

* ``segnet_teacher`` / ``segnet_student``: :class:`SegNet`, a U-Net-style encoder-decoder (three conv stages with
  2x2 max-pooling, two decoder stages that upsample and add the encoder's skip features, a 1x1 classifier).
  Taps ``stage1``-``stage3`` (encoder, full, 1/2 and 1/4 resolution), ``decoder2`` (1/2), ``decoder1`` (full,
  the classifier's input).
* ``vit_seg_student``: :class:`ViTSegmenter`, a real timm ``VisionTransformer`` (small depth and width, patch 4,
  no class token; the ``zoo`` extra) with a light decoder to per-pixel logits. Taps ``low`` (the first
  transformer block's tokens as a ``(D, H/p, W/p)`` map) and ``high`` (the decoder's full-resolution features,
  the classifier's input).
* ``torchvision:lraspp_mobilenet_v3_large``, ``deeplabv3_*``, ``fcn_*`` (:func:`torchvision_segmenter`): random
  weights (``weights=None`` and ``weights_backbone=None``: nothing is downloaded), the first convolution
  rebuilt for the data's channels, the output dict's ``"out"`` returned as the logits, and the backbone's stages
  as taps ``stage1``... (ResNet: ``layer1``-``layer4``; MobileNetV3: the last block at each resolution).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.models.registry import register_model


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(_conv_bn_relu(cin, cout), _conv_bn_relu(cout, cout))


class SegNet(nn.Module):
    """A small U-Net-style encoder-decoder for per-pixel classification.

    Encoder: ``stage1`` (two 3x3 conv-BN-ReLU at ``c1``, full resolution), 2x2 max-pool, ``stage2`` (``c2``, 1/2),
    2x2 max-pool, ``stage3`` (``c3``, 1/4). Decoder: ``stage3`` is upsampled (bilinear) to 1/2, projected to ``c2``
    by a 1x1 conv and added to ``stage2``, then one conv-BN-ReLU gives ``decoder2``; the same to full resolution
    with ``stage1`` gives ``decoder1``; a 1x1 conv classifies each pixel.

    Args:
        num_classes: Output channels (classes per pixel, background included).
        in_channels: Image channels.
        widths: ``(c1, c2, c3)``.
    """

    def __init__(self, *, num_classes: int, in_channels: int, widths: tuple[int, int, int]) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.stage1 = _block(in_channels, c1)
        self.stage2 = nn.Sequential(nn.MaxPool2d(2), _block(c1, c2))
        self.stage3 = nn.Sequential(nn.MaxPool2d(2), _block(c2, c3))
        self.lateral2 = nn.Conv2d(c3, c2, 1)
        self.decoder2 = _conv_bn_relu(c2, c2)
        self.lateral1 = nn.Conv2d(c2, c1, 1)
        self.decoder1 = _conv_bn_relu(c1, c1)
        self.classifier = nn.Conv2d(c1, num_classes, 1)
        self.feature_taps = {name: name for name in ("stage1", "stage2", "stage3", "decoder2", "decoder1")}

    @staticmethod
    def _up(x: Tensor, like: Tensor) -> Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes, H, W)`` for images ``(B, C, H, W)`` (``H``, ``W`` any size)."""
        f1 = self.stage1(x)
        f2 = self.stage2(f1)
        f3 = self.stage3(f2)
        d2 = self.decoder2(f2 + self._up(self.lateral2(f3), f2))
        d1 = self.decoder1(f1 + self._up(self.lateral1(d2), f1))
        return self.classifier(d1)


@register_model("segnet_teacher", help="small U-Net-style segmentation teacher (32/64/128 channels, ~0.35M params)")
def segnet_teacher(*, num_classes: int, in_channels: int = 1, width: int = 32) -> SegNet:
    """Segmentation teacher: encoder stages of ``width``, ``2*width``, ``4*width`` channels."""
    return SegNet(num_classes=num_classes, in_channels=in_channels, widths=(width, 2 * width, 4 * width))


@register_model("segnet_student", help="small U-Net-style segmentation student (8/16/32 channels, ~23k params)")
def segnet_student(*, num_classes: int, in_channels: int = 1, width: int = 8) -> SegNet:
    """Segmentation student: encoder stages of ``width``, ``2*width``, ``4*width`` channels."""
    return SegNet(num_classes=num_classes, in_channels=in_channels, widths=(width, 2 * width, 4 * width))


# -- a small ViT segmenter (timm) ------------------------------------------------------------------------------------

class ViTSegmenter(nn.Module):
    """A small Vision Transformer for per-pixel classification: timm's ``VisionTransformer`` and a light decoder.

    Encoder: timm's patch embedding (``patch_size``), learned position embedding, ``depth`` pre-norm transformer
    blocks of width ``embed_dim`` and the final norm, no class token (every token is a patch). The first block's
    tokens, laid out as a ``(embed_dim, H/p, W/p)`` map, are the ``low`` tap. Decoder: the last tokens as a map, a
    1x1 conv-BN-ReLU to ``decoder_width``, bilinear upsampling to the input's size and a 3x3 conv-BN-ReLU (the
    ``high`` tap), then a 1x1 classifier.

    Args:
        num_classes: Output channels (classes per pixel, background included).
        in_channels: Image channels.
        image_size: Image height and width (a multiple of ``patch_size``).
        patch_size: Side of a patch; 4 on 48x48 scenes gives a 12x12 token grid.
        embed_dim: Token width.
        depth: Transformer blocks (at least 1; the first one's output is ``low``).
        num_heads: Attention heads (dividing ``embed_dim``).
        mlp_ratio: Hidden width of each block's MLP over ``embed_dim``.
        decoder_width: Channels of the decoder's features.
    """

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int, patch_size: int = 4,
                 embed_dim: int = 32, depth: int = 2, num_heads: int = 2, mlp_ratio: float = 2.0,
                 decoder_width: int = 16) -> None:
        super().__init__()
        try:
            from timm.models.vision_transformer import VisionTransformer
        except ImportError as err:  # pragma: no cover - the zoo extra is installed in development
            raise KdkitError("the ViT segmenter is built from timm, which is not installed", bad="timm",
                             fix="pip install 'kdkit[zoo]'") from err
        if image_size % patch_size:
            raise KdkitError(f"image size {image_size} is not a multiple of the patch size {patch_size}",
                             bad=str(patch_size), fix="give a patch_size that divides the image size")
        self.vit = VisionTransformer(img_size=image_size, patch_size=patch_size, in_chans=in_channels,
                                     num_classes=0, global_pool="", class_token=False, embed_dim=embed_dim,
                                     depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.low = nn.Identity()  # tap points: named modules the maps pass through
        self.high = nn.Identity()
        self.reduce = nn.Sequential(nn.Conv2d(embed_dim, decoder_width, 1, bias=False), nn.BatchNorm2d(decoder_width),
                                    nn.ReLU(inplace=True))
        self.refine = _conv_bn_relu(decoder_width, decoder_width)
        self.classifier = nn.Conv2d(decoder_width, num_classes, 1)
        self.feature_taps = {"low": "low", "high": "high"}

    def _grid(self, tokens: Tensor, x: Tensor) -> Tensor:
        """``(B, N, D)`` patch tokens as a ``(B, D, H/p, W/p)`` map."""
        patch = self.vit.patch_embed.patch_size
        h, w = x.shape[-2] // patch[0], x.shape[-1] // patch[1]
        return tokens.transpose(1, 2).reshape(len(tokens), -1, h, w)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes, H, W)`` for images ``(B, C, H, W)`` of the built size."""
        vit = self.vit
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        tokens = vit.blocks[0](tokens)
        self.low(self._grid(tokens, x))
        for block in vit.blocks[1:]:
            tokens = block(tokens)
        features = self.reduce(self._grid(vit.norm(tokens), x))
        features = F.interpolate(features, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.high(self.refine(features)))


@register_model("vit_seg_student", help="small ViT segmenter: timm VisionTransformer (patch 4, 32 wide, 2 blocks) "
                                        "+ light decoder, ~30k params (needs timm: the zoo extra)")
def vit_seg_student(*, num_classes: int, in_channels: int = 1, image_size: int = 48, patch_size: int = 4,
                    embed_dim: int = 32, depth: int = 2, num_heads: int = 2, mlp_ratio: float = 2.0,
                    decoder_width: int = 16) -> ViTSegmenter:
    """Segmentation ViT student: see :class:`ViTSegmenter` for the parameters."""
    return ViTSegmenter(num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                        patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                        mlp_ratio=mlp_ratio, decoder_width=decoder_width)


# -- torchvision ------------------------------------------------------------------------------------------------------

def torchvision_segmenters() -> list[str]:
    """torchvision's segmentation model names (``torchvision.models.segmentation``)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models.segmentation)


class TorchvisionSegmenter(nn.Module):
    """A torchvision segmenter whose forward returns its ``"out"`` logits ``(B, K, H, W)`` instead of a dict.

    Args:
        model: The torchvision model (``backbone``, ``classifier``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.feature_taps = {f"stage{i}": f"model.backbone.{path}"
                             for i, path in enumerate(backbone_stages(model.backbone), start=1)}

    def forward(self, x: Tensor) -> Tensor:
        """Per-pixel logits at the input's resolution."""
        return self.model(x)["out"]


def backbone_stages(backbone: nn.Module) -> list[str]:
    """The module paths (inside ``backbone``) of the last block at each resolution of a torchvision backbone.

    ResNet: ``layer1``-``layer4``. MobileNetV3 (a sequence of blocks, those that start a lower resolution marked
    ``_is_cn`` as torchvision's own stage split reads them): the block before each such block, and the last one.
    """
    names = [name for name, _ in backbone.named_children()]
    if "layer1" in names:
        return [name for name in ("layer1", "layer2", "layer3", "layer4") if name in names]
    blocks = list(backbone.named_children())
    ends = [blocks[i - 1][0] for i, (_, block) in enumerate(blocks) if i and getattr(block, "_is_cn", False)]
    return [*ends, blocks[-1][0]]


def _rebuild_first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the first 3-channel convolution by one reading ``in_channels`` (same shape otherwise, fresh weights)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                setattr(parent, name, nn.Conv2d(in_channels, child.out_channels, child.kernel_size, child.stride,
                                                child.padding, child.dilation, child.groups, child.bias is not None,
                                                child.padding_mode))
                return
    raise KdkitError(f"{type(model).__name__} has no 3-channel first convolution to adapt to {in_channels} channels",
                     fix="use RGB data or a kdkit segmentation model")


def torchvision_segmenter(name: str, *, num_classes: int, in_channels: int, params: dict[str, Any],
                          where: str | None = None) -> TorchvisionSegmenter:
    """torchvision segmenter ``name`` with random weights, ``num_classes`` outputs and ``in_channels`` inputs.

    Args:
        name: A name of :func:`torchvision_segmenters`.
        num_classes: Output channels.
        in_channels: Image channels (the first convolution is rebuilt when it is not 3).
        params: Further keyword arguments of the torchvision builder (e.g. ``aux_loss`` is refused: only
            ``"out"`` is used).
        where: Recipe location for errors.
    """
    import torchvision

    for fixed in ("weights", "weights_backbone", "num_classes", "aux_loss"):
        if fixed in params:
            raise KdkitError(f"torchvision:{name} parameter {fixed!r} is set by kdkit", bad=fixed,
                             fix=f"remove {fixed} from the model's params (weights are random, the outputs are the "
                                 "task's, the auxiliary head is not used)", where=where)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes,
                                         **params)
    if in_channels != 3:
        _rebuild_first_conv(model, in_channels)
    return TorchvisionSegmenter(model)
