"""UperNet semantic segmentation on the ADDP backbone.

    images (B, 3, H, W) in [0, 1] --ImageNet mean/std--> backbone: four blocks' maps, or the last
    block's for a patch finer than 16 (stride p)
    --MultiLevelNeck--> strides 4, 8, 16, 32 --UperNet (PPM on stride 32 + FPN fusion)-->
    (B, D, H/4, W/4) --dropout, 1x1 conv--> logits, upsampled to (B, K, H, W)

The UperNet decoder is segmentation_models_pytorch's `UPerNetDecoder` (PPM sizes 1, 2, 3, 6,
BatchNorm): it takes a list of maps from stride 1 upwards and reads those from stride 4, which
is what the neck gives. Labels use 255 for "ignore" (ADE20k's label 0).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

from ..models.classifier import _Normalise
from ..models.registry import check_config, register_model_class
from .backbone import BackboneConfig, ViTDetBackbone
from .necks import MultiLevelNeck

IGNORE = 255


@dataclass(frozen=True)
class SegmenterConfig:
    name: str = "upernet_vit"
    kind: str = "segmenter"
    backbone: dict = field(default_factory=lambda: dataclasses.asdict(BackboneConfig(out_indices=(3, 5, 7, 11))))
    num_classes: int = 150
    decoder_channels: int = 512
    dropout: float = 0.1

    def __post_init__(self):
        check_config(self, ints=dict(num_classes=1, decoder_channels=1), fractions=("dropout",))

    @property
    def backbone_config(self) -> BackboneConfig:
        return BackboneConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.backbone.items()})


@register_model_class("segmenter")
class Segmenter(nn.Module):
    config_class = SegmenterConfig

    def __init__(self, config: SegmenterConfig):
        super().__init__()
        self.config = c = config
        b = c.backbone_config
        if len(b.out_indices) not in (1, 4):
            raise ValueError(f"UperNet takes four blocks' maps or the last one; out_indices is {b.out_indices}")
        self.normalise = _Normalise()
        self.encoder = ViTDetBackbone(b)
        self.neck = MultiLevelNeck(b.embed_dim, b.patch_size)
        self.decoder = UPerNetDecoder([3, 0] + [b.embed_dim] * 4, encoder_depth=5, decoder_channels=c.decoder_channels)
        self.dropout = nn.Dropout2d(c.dropout)
        self.classifier = nn.Conv2d(c.decoder_channels, c.num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> logits (B, num_classes, H, W)."""
        maps = self.neck(self.encoder(self.normalise(images)))
        x = self.decoder([None, None, *maps])  # the decoder skips the stride-1 and -2 slots
        x = self.classifier(self.dropout(x))
        return F.interpolate(x, size=images.shape[-2:], mode="bilinear", align_corners=False)


class SegmentationObjective(nn.Module):
    def __init__(self, model: Segmenter):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(images), targets, ignore_index=IGNORE)


@torch.no_grad()
def predict(model: Segmenter, image: torch.Tensor, crop: int | None = None, stride: int | None = None) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> class scores (K, H, W). Whole-image inference when `crop` is None
    or the image fits in it; otherwise sliding `crop` x `crop` windows every `stride` pixels
    (the ADE20k protocol), averaging the overlaps. H and W must be multiples of the patch."""
    was = model.training
    model.eval()
    try:
        _, H, W = image.shape
        if crop is None or (H <= crop and W <= crop):
            return model(image[None])[0].softmax(0)
        stride = stride or crop * 2 // 3
        scores = image.new_zeros(model.config.num_classes, H, W)
        count = image.new_zeros(1, H, W)
        for y in _starts(H, crop, stride):
            for x in _starts(W, crop, stride):
                tile = image[:, y:y + crop, x:x + crop]
                scores[:, y:y + crop, x:x + crop] += model(tile[None])[0].softmax(0)
                count[:, y:y + crop, x:x + crop] += 1
        return scores / count
    finally:
        model.train(was)


def _starts(size: int, crop: int, stride: int) -> list[int]:
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop, stride))
    return starts + [size - crop]
