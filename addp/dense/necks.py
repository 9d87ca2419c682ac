"""Necks from the plain ViT's stride-p maps to a feature pyramid.

`SimpleFeaturePyramid` (ViTDet, detection): the last map alone, resampled to strides 4, 8, 16,
32 by transposed convs / identity / max-pooling, each level through a 1x1 + 3x3 conv with
LayerNorm, plus a max-pooled stride-64 level: an OrderedDict as torchvision's detectors take.
`MultiLevelNeck` (BEiT / MAE segmentation): four blocks' maps, resampled to strides 4, 8, 16,
32 the same way (deconv x4, deconv x2, identity, pool for patch 16), channels unchanged; or one
map, the last block's, resampled to all four strides (ViTDet's single-map pyramid), which is what
an encoder with a fine patch needs: with patch 4, BEiT's assignment would put the first block at
stride 4 and pool the last, most semantic one 8x.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

STRIDES = (4, 8, 16, 32)


def resampler(dim: int, scale: float) -> nn.Module:
    """Changes a map's resolution by `scale` (a power of two): transposed convs (LayerNorm + GELU
    between them) to go up, identity, or max-pooling to go down."""
    if scale == 1:
        return nn.Identity()
    if scale < 1:
        k = round(1 / scale)
        return nn.MaxPool2d(k, k)
    layers = []
    for i in range(round(math.log2(scale))):
        if i:
            layers += [LayerNorm2d(dim), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim, 2, stride=2))
    return nn.Sequential(*layers)


class SimpleFeaturePyramid(nn.Module):
    """(B, C, H/p, W/p) -> OrderedDict "0".."3" (strides 4..32) and "pool" (stride 64), each
    with `out_channels` channels."""

    def __init__(self, dim: int, patch_size: int, out_channels: int = 256):
        super().__init__()
        self.out_channels = out_channels
        self.levels = nn.ModuleList()
        for stride in STRIDES:
            self.levels.append(nn.Sequential(
                resampler(dim, patch_size / stride),
                nn.Conv2d(dim, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)))

    def forward(self, x: torch.Tensor) -> OrderedDict:
        out = OrderedDict((str(i), level(x)) for i, level in enumerate(self.levels))
        out["pool"] = F.max_pool2d(out[str(len(self.levels) - 1)], 1, 2)  # ViTDet's LastLevelMaxPool
        return out


class MultiLevelNeck(nn.Module):
    """Four (B, C, H/p, W/p) maps, or one used at every level -> four maps at strides 4, 8, 16,
    32 (C channels)."""

    def __init__(self, dim: int, patch_size: int):
        super().__init__()
        self.levels = nn.ModuleList(resampler(dim, patch_size / s) for s in STRIDES)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(maps) == 1:
            maps = maps * len(self.levels)
        return [level(m) for level, m in zip(self.levels, maps)]


class BackboneWithPyramid(nn.Module):
    """A ViT backbone and SimpleFeaturePyramid: what torchvision's MaskRCNN calls its backbone."""

    def __init__(self, body: nn.Module, out_channels: int):
        super().__init__()
        self.body = body
        self.fpn = SimpleFeaturePyramid(body.config.embed_dim, body.config.patch_size, out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict:
        return self.fpn(self.body(x)[-1])
