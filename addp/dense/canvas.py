"""Digits on a canvas: deterministic dense-recognition datasets from the bundled digits.

Each canvas (`size` x `size`, a dark grey background with noise) holds 2-4 digits at random
positions, drawn in bright greys at 24-40 px on a 96 px canvas: the scale and the grey levels of
the 32 px digits the main job pretrains on, as COCO's objects share ImageNet's statistics.
Later digits occlude earlier ones and boxes overlap little (placement is redrawn a few times
when they would). A digit's instance mask is its stroke pixels (intensity > 0.35) that stay
visible; its box is the mask's extent. The train canvases use the train digits and the
validation canvases the held-out ones.

Written in the layouts the readers take, so the same code reads them and COCO / ADE20k:
    coco/train2017/*.png, coco/val2017/*.png, coco/annotations/instances_{train,val}2017.json
        (categories 1..10 named "0".."9", masks as RLE)
    ade/images/{training,validation}/*.png, ade/annotations/{training,validation}/*.png
        (label 1 = background, 2 + d = digit d; 0, ADE20k's "ignore", is unused)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from ..training.data import load_digits
from ..runs.files import atomic_write

CLASSES = ("background",) + tuple(str(d) for d in range(10))  # the ade/ labels 1..11 as classes 0..10
SPLITS = {"train": ("train", "train2017", "training"), "val": ("heldout", "val2017", "validation")}


def draw_canvas(digits: torch.Tensor, labels: torch.Tensor, size: int, g: torch.Generator,
                scale: tuple = (0.25, 0.42)):
    """One canvas from a pool of (N, 32, 32) digit intensities.

    Returns image (size, size, 3) uint8, instance ids (size, size) int (0 = none, k = k-th
    placed digit) and the placed digits' labels."""
    shade = torch.rand((), generator=g) * 0.15
    image = (shade + torch.rand(size, size, generator=g) * 0.08).expand(3, -1, -1).clone()
    ids = torch.zeros(size, size, dtype=torch.int64)
    boxes, placed = [], []
    for _ in range(int(torch.randint(2, 5, (), generator=g))):
        i = int(torch.randint(len(digits), (), generator=g))
        s = int(size * (scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=g))))
        for _ in range(10):  # redraw the position while it overlaps a placed digit by > 30%
            y, x = (int(v) for v in torch.randint(0, size - s + 1, (2,), generator=g))
            if all(_overlap((y, x, s), b) <= 0.3 for b in boxes):
                break
        glyph = F.interpolate(digits[i][None, None], size=(s, s), mode="bilinear", align_corners=False)[0, 0]
        colour = 0.7 + 0.3 * torch.rand((), generator=g)
        region = image[:, y:y + s, x:x + s]
        image[:, y:y + s, x:x + s] = region * (1 - glyph) + colour * glyph
        ids[y:y + s, x:x + s][glyph > 0.35] = len(placed) + 1
        boxes.append((y, x, s))
        placed.append(int(labels[i]))
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy(), ids.numpy(), placed


def _overlap(a, b) -> float:
    (ya, xa, sa), (yb, xb, sb) = a, b
    inter = max(0, min(ya + sa, yb + sb) - max(ya, yb)) * max(0, min(xa + sa, xb + sb) - max(xa, xb))
    return inter / min(sa * sa, sb * sb)


def build_canvases(root: str | Path, size: int = 96, train: int = 600, val: int = 150, seed: int = 0,
                   tuning: bool = False) -> dict:
    """Write both datasets under `root` (coco/, ade/); the same seed gives the same files.
    `tuning`: both splits from the train digits (the first 80 % for training, the rest for
    validation), to choose settings without seeing the held-out digits. Returns the paths the
    commands take."""
    root = Path(root)
    digits = {split: load_digits(split, 32) for split in ("train", "heldout")}
    if tuning:
        images, labels = digits["train"]
        cut = len(labels) * 4 // 5
        digits = {"train": (images[:cut], labels[:cut]), "heldout": (images[cut:], labels[cut:])}
    for name, count in (("train", train), ("val", val)):
        source, coco_split, ade_split = SPLITS[name]
        images, labels = digits[source]
        g = torch.Generator().manual_seed(seed * 1000 + (name == "val"))
        coco = {"images": [], "annotations": [], "categories": [{"id": k, "name": CLASSES[k]} for k in range(1, 11)]}
        for folder in (root / "coco" / coco_split, root / "ade" / "images" / ade_split,
                       root / "ade" / "annotations" / ade_split):
            folder.mkdir(parents=True, exist_ok=True)
        for n in range(count):
            image, ids, placed = draw_canvas(images[:, 0], labels, size, g)
            file = f"{n:06d}.png"
            Image.fromarray(image).save(root / "coco" / coco_split / file)
            Image.fromarray(image).save(root / "ade" / "images" / ade_split / file)
            semantic = np.ones((size, size), np.uint8)
            coco["images"].append({"id": n + 1, "file_name": file, "width": size, "height": size})
            for k, digit in enumerate(placed, start=1):
                mask = ids == k
                if not mask.any():
                    continue  # fully occluded
                semantic[mask] = 2 + digit
                coco["annotations"].append(_annotation(len(coco["annotations"]) + 1, n + 1, digit + 1, mask))
            Image.fromarray(semantic).save(root / "ade" / "annotations" / ade_split / file)
        path = root / "coco" / "annotations" / f"instances_{coco_split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(coco)))
    return {"coco": str(root / "coco"), "ade": str(root / "ade"), "size": size}


def _annotation(ann_id: int, image_id: int, category: int, mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return {"id": ann_id, "image_id": image_id, "category_id": category, "iscrowd": 0,
            "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0], "area": int(mask.sum()),
            "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()}}
