"""Pictures of predictions: boxes, labels, scores and masks drawn on the image, or a
segmentation map beside the image (torchvision's drawing utilities), written atomically."""
from __future__ import annotations

from pathlib import Path

import torch
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from torchvision.ops import nms
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..runs.files import atomic_write


def _save(image: torch.Tensor, path) -> Path:
    array = image.permute(1, 2, 0).contiguous().numpy()
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def draw_detections(image: torch.Tensor, pred: dict, path, names: list[str], threshold: float = 0.5,
                    zoom: int = 4) -> Path:
    """image (3, H, W) in [0, 1]; pred from `detection.predict` (labels 1..K name names[label - 1]).
    Draws the detections scoring at least `threshold` that no higher-scoring one of any class
    overlaps by IoU > 0.5: each object with its best label."""
    keep = torch.zeros_like(pred["scores"], dtype=torch.bool)
    confident = (pred["scores"] >= threshold).nonzero()[:, 0]
    keep[confident[nms(pred["boxes"][confident], pred["scores"][confident], 0.5)]] = True
    img = (image * 255).round().byte()
    img = torch.nn.functional.interpolate(img[None].float(), scale_factor=zoom, mode="nearest")[0].byte()
    if keep.any():
        masks = torch.nn.functional.interpolate(pred["masks"][keep][None], scale_factor=zoom)[0] > 0.5
        img = draw_segmentation_masks(img, masks, alpha=0.4)
        text = [f"{names[int(l) - 1]} {float(s):.2f}" for l, s in zip(pred["labels"][keep], pred["scores"][keep])]
        img = draw_bounding_boxes(img, pred["boxes"][keep] * zoom, labels=text, colors="yellow")
    return _save(img, path)


def draw_segmentation(image: torch.Tensor, classes: torch.Tensor, path, num_classes: int, zoom: int = 4,
                      names: list[str] | None = None, min_pixels: int = 20) -> Path:
    """image (3, H, W) in [0, 1] and its class map (H, W): the image and the map side by side,
    class 0 black; with `names`, each connected region of another class of at least `min_pixels`
    pixels carries its class's name."""
    g = torch.Generator().manual_seed(0)
    palette = (torch.rand(num_classes, 3, generator=g) * 255).byte()
    palette[0] = 0
    classes = classes.clamp(0, num_classes - 1)
    seg = palette[classes].permute(2, 0, 1)
    both = torch.cat([(image * 255).round().byte(), seg], dim=2)
    big = torch.nn.functional.interpolate(both[None].float(), scale_factor=zoom)[0].byte()
    if not names:
        return _save(big, path)
    picture = Image.fromarray(big.permute(1, 2, 0).contiguous().numpy())
    pen = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=4 * zoom)
    offset = image.shape[2] * zoom  # the map is the right half
    for c in classes.unique().tolist():
        if c == 0:
            continue
        regions, count = ndimage.label((classes == c).numpy())
        for r in range(1, count + 1):
            ys, xs = np.nonzero(regions == r)
            if len(ys) >= min_pixels:
                at = (offset + xs.mean() * zoom, ys.mean() * zoom)
                pen.text(at, names[c], font=font, anchor="mm", fill="white", stroke_width=2, stroke_fill="black")
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
