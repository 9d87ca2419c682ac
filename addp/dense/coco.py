"""COCO-format instance data (`annotations/instances_<split>.json` + `<split>/` images) and
COCO evaluation with pycocotools' COCOeval.

Items are square canvases of `size`: the image resized so its longer side is `size` (times a
factor drawn from `jitter` when training: large-scale jitter is (0.1, 2.0)), randomly cropped
when larger and zero-padded to `size`. Checked on loading, each failure one `AddpError` line
naming the file and the record: the file's shape, every category, image and annotation record
(`_check_*`), each image file's header (present, readable, not a decompression bomb, the size
its record says). Images are decoded by `runs.images.read_rgb`. Documented skips: crowd
annotations and boxes of zero size after clipping to the image are not training targets
(COCOeval still sees them). Polygon and RLE (compressed or not) masks are both read.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..errors import AddpError, first_line
from ..runs.images import UnreadableImage, image_header, read_rgb
from ..runtime.seeds import item_seed

log = logging.getLogger(__name__)
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def quiet(fn, *args):
    """pycocotools prints progress on stdout, where the commands print their JSON summary."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def read_coco(root: Path, split: str) -> COCO:
    """`root/annotations/instances_<split>.json`, every record checked, its images' headers read."""
    path = Path(root) / "annotations" / f"instances_{split}.json"
    if not path.is_file():
        raise AddpError(f"no {path} (expected a COCO root with annotations/instances_{split}.json)")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise AddpError(f"{path}: not a JSON file ({first_line(e)})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in LISTS):
        what = f"a JSON object without {', '.join(k for k in LISTS if not isinstance(data.get(k), list))}" \
            if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise AddpError(f"{path}: a COCO instances file is a JSON object with lists {', '.join(LISTS)}; "
                        f"this is {what}")
    cats = _unique(path, "categories", [_check_category(c, _where(path, "categories", i, c))
                                        for i, c in enumerate(data["categories"])])
    _unique(path, "images", [_check_image(img, _where(path, "images", i, img))
                                      for i, img in enumerate(data["images"])])
    sizes = {img["id"]: (img["height"], img["width"]) for img in data["images"]}
    _unique(path, "annotations", [_check_annotation(a, _where(path, "annotations", i, a), sizes, cats)
                                  for i, a in enumerate(data["annotations"])])
    dropped = sum(_drop_degenerate_polygons(a, sizes[a["image_id"]]) for a in data["annotations"])
    if dropped:  # COCO 2017 holds a few; detectron2 drops them too
        log.info(f"[coco] {split}: {dropped} polygons of fewer than 3 points are left out of their masks")
    folder = Path(root) / split
    missing = [img["file_name"] for img in data["images"] if not (folder / img["file_name"]).is_file()]
    if missing:
        raise AddpError(f"{path}: {len(missing)} listed images are not in {folder} (first: {missing[0]})")
    for i, img in enumerate(data["images"]):
        _check_image_file(folder / img["file_name"], img, _where(path, "images", i, img))
    coco = COCO()
    coco.dataset = data
    quiet(coco.createIndex)
    return coco


LISTS = ("images", "annotations", "categories")


def _where(path: Path, kind: str, index: int, record) -> str:
    """How a message names a record: the file, the list and position, and the id when there is one."""
    rid = record.get("id") if isinstance(record, dict) else None
    return f"{path}: {kind}[{index}]" + (f" (id {rid!r})" if rid is not None else "")


def _unique(path: Path, kind: str, ids: list) -> set:
    seen = set()
    for i, rid in enumerate(ids):
        if rid in seen:
            raise AddpError(f"{path}: {kind}[{i}] repeats the id {rid} of an earlier entry")
        seen.add(rid)
    return seen


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _record(record, where: str, kind: str) -> int:
    if not isinstance(record, dict):
        raise AddpError(f"{where}: {kind} entry is a JSON object, not {json.dumps(record)[:60]}")
    if not _is_int(record.get("id")):
        raise AddpError(f"{where}: {kind} entry needs an integer id")
    return record["id"]


def _check_category(cat, where: str) -> int:
    cid = _record(cat, where, "a category")
    if not isinstance(cat.get("name"), str):
        raise AddpError(f"{where}: a category needs a name (a string)")
    return cid


def _check_image(img, where: str) -> int:
    iid = _record(img, where, "an image")
    for key in ("height", "width"):
        if not (_is_int(img.get(key)) and img[key] > 0):
            raise AddpError(f"{where}: {key} must be a positive integer, not {img.get(key)!r}")
    name = img.get("file_name")
    if not isinstance(name, str) or not name:
        raise AddpError(f"{where}: file_name must be a file name (a string), not {name!r}")
    if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
        raise AddpError(f"{where}: file_name {name!r} leaves the image folder (absolute or with '..')")
    return iid


def _check_image_file(file: Path, img: dict, where: str) -> None:
    try:
        width, height, _, _ = image_header(file)
    except UnreadableImage as e:
        raise AddpError(f"{first_line(e, None)} (listed in {where})") from None
    if (height, width) != (img["height"], img["width"]):
        raise AddpError(f"{file} is {width}x{height} but {where} says {img['width']}x{img['height']}")


def _check_annotation(ann, where: str, sizes: dict, cats: set) -> int:
    aid = _record(ann, where, "an annotation")
    if not (_is_int(ann.get("image_id")) and ann["image_id"] in sizes):
        raise AddpError(f"{where}: names image {ann.get('image_id')!r}, which is not listed")
    if not (_is_int(ann.get("category_id")) and ann["category_id"] in cats):
        raise AddpError(f"{where}: has unknown category {ann.get('category_id')!r}")
    box = ann.get("bbox")
    if "bbox" not in ann:
        raise AddpError(f"{where}: has no bbox (4 finite numbers [x, y, width, height])")
    if not (isinstance(box, list) and len(box) == 4 and all(map(_is_number, box))):
        raise AddpError(f"{where}: bbox must be 4 finite numbers [x, y, width, height], not {json.dumps(box)[:80]}")
    if ann.get("iscrowd", 0) not in (0, 1):
        raise AddpError(f"{where}: iscrowd must be 0 or 1, not {ann.get('iscrowd')!r}")
    _check_segmentation(ann.get("segmentation"), where, sizes[ann["image_id"]])
    return aid


def _check_segmentation(seg, where: str, size: tuple) -> None:
    """Polygons: lists of x, y points; RLE: the image's size and counts."""
    if isinstance(seg, list):
        if not seg:
            raise AddpError(f"{where}: segmentation is an empty list of polygons")
        for k, poly in enumerate(seg):
            if not (isinstance(poly, list) and len(poly) % 2 == 0 and all(map(_is_number, poly))):
                raise AddpError(f"{where}: polygon {k} must be x, y pairs of finite numbers "
                                f"(it has {len(poly) if isinstance(poly, list) else json.dumps(poly)[:40]})")
        return
    if not (isinstance(seg, dict) and {"size", "counts"} <= set(seg)):
        raise AddpError(f"{where}: has no polygon or RLE segmentation")
    rle_size = seg["size"]
    if not (isinstance(rle_size, list) and len(rle_size) == 2 and all(_is_int(v) for v in rle_size)):
        raise AddpError(f"{where}: RLE size must be 2 integers [height, width], not {json.dumps(rle_size)[:60]}")
    if tuple(rle_size) != size:
        raise AddpError(f"{where}: RLE size {rle_size[1]}x{rle_size[0]} (width x height) differs from its "
                        f"image's {size[1]}x{size[0]}")
    counts = seg["counts"]
    if isinstance(counts, list):
        if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != size[0] * size[1]:
            raise AddpError(f"{where}: RLE counts must be non-negative integers summing to height x width")
    elif not isinstance(counts, str):
        raise AddpError(f"{where}: RLE counts must be a string (compressed) or a list of integers")


def _drop_degenerate_polygons(ann: dict, size: tuple) -> int:
    """Leave out an annotation's polygons of fewer than 3 points (pycocotools cannot draw them);
    one left with none gets an empty mask. Returns how many were left out."""
    seg = ann.get("segmentation")
    if not isinstance(seg, list):
        return 0
    kept = [poly for poly in seg if len(poly) >= 6]
    if len(kept) < len(seg):
        empty = mask_utils.encode(np.zeros(size, np.uint8, order="F"))
        ann["segmentation"] = kept or {"size": list(size), "counts": empty["counts"].decode()}
    return len(seg) - len(kept)


def check_same_categories(train_set: "CocoInstances", val_set: "CocoInstances") -> None:
    """The detector's labels are positions in the training categories: validation must list the same ids."""
    if train_set.cat_ids != val_set.cat_ids:
        raise AddpError(f"the category ids of {val_set.path} {val_set.cat_ids} differ from those of "
                        f"{train_set.path} {train_set.cat_ids}: both splits must list the same categories")


class CocoInstances(torch.utils.data.Dataset):
    """Items (image (3, S, S) in [0, 1], target dict, unreadable=0); keys are (index, epoch)."""

    def __init__(self, root, split: str, size: int, train: bool = False, jitter: tuple = (1.0, 1.0), seed: int = 0):
        self.root, self.folder, self.size, self.train = Path(root), Path(root) / split, size, train
        self.path = self.root / "annotations" / f"instances_{split}.json"
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
        image = torch.from_numpy(np.asarray(read_rgb(self.folder / info["file_name"])).copy())
        image = image.permute(2, 0, 1).float() / 255
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
