"""COCO-format instance data (`annotations/instances_<split>.json` + `<split>/` images) and
COCO evaluation with pycocotools' COCOeval.

Items are square canvases of `size`: the image resized so its longer side is `size` (times a
factor drawn from `jitter` when training: large-scale jitter is (0.1, 2.0)), randomly cropped
when larger and zero-padded to `size`. Checked on loading: every image file exists, every
annotation names a known image and category. Documented skips: crowd annotations and boxes of
zero size after clipping to the image are not training targets (COCOeval still sees them).
Polygon and RLE (compressed or not) masks are both read.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..errors import AddpError
from ..runtime.seeds import item_seed

log = logging.getLogger(__name__)
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def quiet(fn, *args):
    """pycocotools prints progress on stdout, where the commands print their JSON summary."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def read_coco(root: Path, split: str) -> COCO:
    path = Path(root) / "annotations" / f"instances_{split}.json"
    if not path.is_file():
        raise AddpError(f"no {path} (expected a COCO root with annotations/instances_{split}.json)")
    try:
        coco = quiet(COCO, str(path))
    except (ValueError, KeyError, TypeError) as e:
        raise AddpError(f"{path}: not a COCO instances file ({e})") from None
    known_images, known_cats = set(coco.imgs), set(coco.cats)
    for ann in coco.dataset.get("annotations", []):
        if ann.get("image_id") not in known_images:
            raise AddpError(f"{path}: annotation {ann.get('id')} names image {ann.get('image_id')}, which is not listed")
        if ann.get("category_id") not in known_cats:
            raise AddpError(f"{path}: annotation {ann.get('id')} has unknown category {ann.get('category_id')}")
        seg = ann.get("segmentation")
        if not (isinstance(seg, list) or (isinstance(seg, dict) and {"size", "counts"} <= set(seg))):
            raise AddpError(f"{path}: annotation {ann['id']} has no polygon or RLE segmentation")
    folder = Path(root) / split
    missing = [img["file_name"] for img in coco.imgs.values() if not (folder / img["file_name"]).is_file()]
    if missing:
        raise AddpError(f"{path}: {len(missing)} listed images are not in {folder} (first: {missing[0]})")
    return coco


class CocoInstances(torch.utils.data.Dataset):
    """Items (image (3, S, S) in [0, 1], target dict, unreadable=0); keys are (index, epoch)."""

    def __init__(self, root, split: str, size: int, train: bool = False, jitter: tuple = (1.0, 1.0), seed: int = 0):
        self.root, self.folder, self.size, self.train = Path(root), Path(root) / split, size, train
        self.coco = read_coco(root, split)
        self.ids = sorted(self.coco.imgs)
        self.cat_ids = sorted(self.coco.cats)
        self.label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.jitter, self.seed = jitter, seed
        skipped = sum(1 for a in self.coco.dataset["annotations"] if not a.get("iscrowd") and self._box(a) is None)
        if skipped:
            log.info(f"[coco] {split}: {skipped} annotations with a box of zero size inside the image are skipped")

    def __len__(self) -> int:
        return len(self.ids)

    def _box(self, ann: dict):
        img = self.coco.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        x0, y0 = max(0.0, x), max(0.0, y)
        x1, y1 = min(float(img["width"]), x + max(w, 0)), min(float(img["height"]), y + max(h, 0))
        return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        info = self.coco.imgs[self.ids[index]]
        image = torch.from_numpy(np.asarray(Image.open(self.folder / info["file_name"]).convert("RGB")).copy())
        image = image.permute(2, 0, 1).float() / 255
        if tuple(image.shape[1:]) != (info["height"], info["width"]):
            raise AddpError(f"{info['file_name']} is {image.shape[2]}x{image.shape[1]} but the json says "
                            f"{info['width']}x{info['height']}")
        anns = [a for a in self.coco.imgToAnns[info["id"]] if not a.get("iscrowd") and self._box(a) is not None]
        boxes = torch.tensor([self._box(a) for a in anns], dtype=torch.float32).reshape(-1, 4)
        masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])) if anns else \
            torch.zeros(0, *image.shape[1:], dtype=torch.uint8)
        g = torch.Generator().manual_seed(item_seed(self.seed, epoch, index))
        factor = self.jitter[0] + (self.jitter[1] - self.jitter[0]) * float(torch.rand((), generator=g))
        scale = self.size / max(image.shape[1:]) * (factor if self.train else 1.0)
        image, boxes, masks, offset = self._fit(image, boxes, masks, scale, g)
        keep = (boxes[:, 2] > boxes[:, 0] + 1) & (boxes[:, 3] > boxes[:, 1] + 1)  # still inside the crop
        target = {"boxes": boxes[keep], "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns],
                                                               dtype=torch.int64).reshape(-1)[keep],
                  "masks": masks[keep], "image_id": info["id"], "scale": scale, "offset": offset,
                  "orig_size": (info["height"], info["width"])}
        return image, target, 0

    def _fit(self, image, boxes, masks, scale: float, g: torch.Generator):
        """Resize by `scale`, crop a random size x size window when larger, pad to size."""
        H0, W0 = image.shape[1:]
        h, w = max(1, round(H0 * scale)), max(1, round(W0 * scale))
        image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        masks = F.interpolate(masks[None].float(), size=(h, w), mode="nearest")[0].byte() if len(masks) else \
            torch.zeros(0, h, w, dtype=torch.uint8)
        boxes = boxes * torch.tensor([w / W0, h / H0, w / W0, h / H0])
        oy = int(torch.randint(0, h - self.size + 1, (), generator=g)) if h > self.size else 0
        ox = int(torch.randint(0, w - self.size + 1, (), generator=g)) if w > self.size else 0
        image, masks = image[:, oy:oy + self.size, ox:ox + self.size], masks[:, oy:oy + self.size, ox:ox + self.size]
        if len(boxes):
            boxes = boxes - torch.tensor([ox, oy, ox, oy], dtype=boxes.dtype)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image.shape[2])
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.shape[1])
        pad = (0, self.size - image.shape[2], 0, self.size - image.shape[1])
        return F.pad(image, pad), boxes, F.pad(masks, pad), (oy, ox)


def to_results(pred: dict, target: dict, cat_ids: list[int]) -> list[dict]:
    """One image's predictions (canvas coordinates, masks as probabilities) -> COCO results in
    the original image's coordinates, masks as RLE (threshold 0.5)."""
    s, (oy, ox), (H, W) = target["scale"], target["offset"], target["orig_size"]
    boxes = (pred["boxes"] + torch.tensor([ox, oy, ox, oy])) / s
    out = []
    masks = pred.get("masks")
    if masks is not None and len(masks):
        h, w = round(H * s), round(W * s)
        full = F.pad(masks, (ox, 0, oy, 0))[:, :h, :w]  # back to the resized image (no crop at eval)
        full = F.pad(full, (0, w - full.shape[2], 0, h - full.shape[1]))
        masks = F.interpolate(full[None], size=(H, W), mode="bilinear", align_corners=False)[0] > 0.5
    for i in range(len(boxes)):
        x0, y0, x1, y1 = boxes[i].tolist()
        r = {"image_id": target["image_id"], "category_id": cat_ids[int(pred["labels"][i]) - 1],
             "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(pred["scores"][i])}
        if masks is not None:
            rle = mask_utils.encode(np.asfortranarray(masks[i].numpy().astype(np.uint8)))
            r["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode()}
        out.append(r)
    return out


def coco_metrics(coco_gt: COCO, results: list[dict], iou_types=("bbox", "segm")) -> dict:
    """COCOeval's AP, AP50, AP75, APs, APm, APl (in %; -1 where COCOeval has no ground truth) per
    IoU type: keys like "bbox_AP"."""
    metrics = {}
    for iou in iou_types:
        if not results:
            metrics.update({f"{iou}_{n}": 0.0 for n in STAT_NAMES})
            continue
        dt = quiet(coco_gt.loadRes, [dict(r) for r in results])
        ev = COCOeval(coco_gt, dt, iou)
        quiet(ev.evaluate)
        quiet(ev.accumulate)
        quiet(ev.summarize)
        metrics.update({f"{iou}_{n}": (100 * float(v) if v >= 0 else -1.0) for n, v in zip(STAT_NAMES, ev.stats[:6])})
    return metrics
