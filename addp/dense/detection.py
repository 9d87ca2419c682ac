"""Mask R-CNN on the ViTDet-style ADDP backbone (torchvision's detector, ViTDet's heads).

    images (B, 3, S, S) in [0, 1] --torchvision transform (ImageNet mean/std)--> backbone
    --> SimpleFeaturePyramid {"0".."3", "pool"} --> RPN --> RoIAlign 7x7 --> 4 conv (LayerNorm)
    + 1 fc box head; RoIAlign 14x14 --> 4 conv (LayerNorm) mask head

Inputs are square canvases of `image_size` (the data pipeline resizes and pads), so
torchvision's own resizing is the identity. Training returns the sum of the RPN and RoI losses;
evaluation returns per image `boxes` (xyxy), `labels` (1..num_classes), `scores`, `masks`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from ..models.addp import IMAGENET_MEAN, IMAGENET_STD
from ..models.registry import check_config, register_model_class
from .backbone import BackboneConfig, ViTDetBackbone
from .necks import BackboneWithPyramid


@dataclass(frozen=True)
class DetectorConfig:
    name: str = "mask_rcnn_vitdet"
    kind: str = "detector"
    backbone: dict = field(default_factory=lambda: dataclasses.asdict(BackboneConfig()))
    num_classes: int = 80  # object classes, background not counted
    out_channels: int = 256  # pyramid and head width
    fc_dim: int = 1024  # the box head's fc layer
    anchor_size: int = 32  # anchors of the stride-4 level; x2 per level (ViTDet: 32..512)
    detections_per_image: int = 100
    proposals: tuple = (2000, 1000)  # RPN proposals kept after NMS per image: (training, evaluation)
    rois_per_image: int = 512  # RoIs sampled per image for the box head's loss
    categories: tuple = ()  # dataset category ids, index i -> label i + 1 (for COCO results)

    def __post_init__(self):
        check_config(self, ints=dict(num_classes=1, out_channels=1, fc_dim=1, anchor_size=1, detections_per_image=1))

    @property
    def backbone_config(self) -> BackboneConfig:
        return BackboneConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.backbone.items()})


@register_model_class("detector")
class Detector(MaskRCNN):
    config_class = DetectorConfig

    def __init__(self, config: DetectorConfig):
        c = config
        b = c.backbone_config
        C = c.out_channels
        backbone = BackboneWithPyramid(ViTDetBackbone(b), C)
        anchors = AnchorGenerator(tuple((c.anchor_size * 2 ** i,) for i in range(5)), ((0.5, 1.0, 2.0),) * 5)
        super().__init__(
            backbone, num_classes=None, min_size=b.image_size, max_size=b.image_size,
            image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 0),
            box_head=FastRCNNConvFCHead((C, 7, 7), [C] * 4, [c.fc_dim], norm_layer=LayerNorm2d),
            box_predictor=FastRCNNPredictor(c.fc_dim, c.num_classes + 1),
            mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 0),
            mask_head=MaskRCNNHeads(C, [C] * 4, 1, norm_layer=LayerNorm2d),
            mask_predictor=MaskRCNNPredictor(C, C, c.num_classes + 1),
            box_detections_per_img=c.detections_per_image, rpn_pre_nms_top_n_train=c.proposals[0],
            rpn_post_nms_top_n_train=c.proposals[0], rpn_pre_nms_top_n_test=c.proposals[1],
            rpn_post_nms_top_n_test=c.proposals[1], box_batch_size_per_image=c.rois_per_image)
        self.config = config

    @property
    def encoder(self) -> ViTDetBackbone:
        return self.backbone.body


class DetectionObjective(nn.Module):
    """Images and targets -> the summed Mask R-CNN losses (what the training loop minimises)."""

    def __init__(self, model: Detector):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, targets: list[dict]) -> torch.Tensor:
        losses = self.model(list(images), targets)
        return sum(losses.values())


@torch.no_grad()
def predict(model: Detector, images: torch.Tensor, score_threshold: float = 0.0) -> list[dict]:
    """(B, 3, S, S) in [0, 1] -> per image {boxes (N, 4) xyxy, labels (N,), scores (N,),
    masks (N, S, S) probabilities}; labels are 1..num_classes."""
    was = model.training
    model.eval()
    try:
        out = model(list(images))
    finally:
        model.train(was)
    return [{k: v[d["scores"] >= score_threshold] if k != "masks" else v[d["scores"] >= score_threshold][:, 0]
             for k, v in d.items()} for d in out]
