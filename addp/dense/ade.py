"""ADE20k-format semantic segmentation data: `images/<split>/*.{jpg,png}` paired by file stem
with `annotations/<split>/*.png` (split `training` / `validation`).

Annotation value 0 is "ignore" (ADE20k's unlabelled pixels) and value v in 1..K is class v - 1,
so labels are 0..K-1 with 255 ignored. Checked on loading (one-line errors naming the file):
every image has its annotation (and the reverse); from the headers, both files are readable and
no decompression bomb, the annotation is a one-channel integer PNG and its size is its image's.
Checked on reading: no value exceeds the K classes. Images are decoded by
`runs.images.read_rgb`, annotations by `open_image` with their values as stored. Training
items: resized so the shorter side is `size` times a factor drawn from `jitter` (0.5-2.0 as in
mmsegmentation's ADE20k pipeline), a random `size` crop, padded with "ignore"; evaluation
items keep the original size (the model pads or slides).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import AddpError
from ..runs.images import SIXTEEN_BIT_MODES, image_header, open_image, read_rgb
from ..runtime.seeds import item_seed
from .segmentation import IGNORE

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LABEL_MODES = ("L", "P", "I", *SIXTEEN_BIT_MODES)  # one channel of integers


def pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    images, annotations = Path(root) / "images" / split, Path(root) / "annotations" / split
    for folder in (images, annotations):
        if not folder.is_dir():
            raise AddpError(f"no {folder} (expected an ADE20k root with images/{split} and annotations/{split})")
    imgs = {p.stem: p for p in sorted(images.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    anns = {p.stem: p for p in sorted(annotations.iterdir()) if p.suffix.lower() == ".png"}
    lonely = sorted(set(imgs) ^ set(anns))
    if lonely:
        where = "annotation" if lonely[0] in imgs else "image"
        raise AddpError(f"{root}: {len(lonely)} images and annotations of {split} are unpaired "
                        f"(first: {lonely[0]} has no {where})")
    if not imgs:
        raise AddpError(f"no images in {images}")
    items = [(imgs[k], anns[k]) for k in sorted(imgs)]
    for image_path, label_path in items:
        _check_pair(image_path, label_path)
    return items


def _check_pair(image_path: Path, label_path: Path) -> None:
    """From the headers: both files readable (no decompression bomb), the annotation a
    one-channel integer PNG of its image's size."""
    width, height, _, _ = image_header(image_path)
    label_width, label_height, mode, kind = image_header(label_path)
    if kind != "PNG" or mode not in LABEL_MODES:
        raise AddpError(f"{label_path}: an annotation must be a one-channel integer PNG of class indices "
                        f"(this is a {kind} of mode {mode})")
    if (label_height, label_width) != (height, width):
        raise AddpError(f"{label_path} is {label_width}x{label_height} but its image {image_path.name} is "
                        f"{width}x{height}")


def read_pair(image_path: Path, label_path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H, W) in [0, 1] and (H, W) int64 labels (255 = ignore), checked."""
    image = np.asarray(read_rgb(image_path))
    raw = np.asarray(open_image(label_path, eight_bit=False))
    if raw.max() > num_classes or raw.min() < 0:
        bad = int(raw.max()) if raw.max() > num_classes else int(raw.min())
        raise AddpError(f"{label_path}: label {bad} beyond the {num_classes} classes (values 1..{num_classes}"
                        f", 0 = ignore)")
    labels = torch.from_numpy(raw.astype(np.int64)) - 1
    labels[labels < 0] = IGNORE
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255, labels


class AdeSegmentation(torch.utils.data.Dataset):
    """Items (image, labels, unreadable=0); keys are (index, epoch)."""

    def __init__(self, root, split: str, num_classes: int, size: int, train: bool = False,
                 jitter: tuple = (0.5, 2.0), seed: int = 0):
        self.items = pairs(Path(root), split)
        self.num_classes, self.size, self.train, self.jitter, self.seed = num_classes, size, train, jitter, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image, labels = read_pair(*self.items[index], self.num_classes)
        if not self.train:
            return image, labels, 0
        g = torch.Generator().manual_seed(item_seed(self.seed, epoch, index))
        factor = self.jitter[0] + (self.jitter[1] - self.jitter[0]) * float(torch.rand((), generator=g))
        scale = self.size * factor / min(image.shape[1:])
        h, w = max(1, round(image.shape[1] * scale)), max(1, round(image.shape[2] * scale))
        image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        labels = F.interpolate(labels[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
        oy = int(torch.randint(0, max(h - self.size, 0) + 1, (), generator=g))
        ox = int(torch.randint(0, max(w - self.size, 0) + 1, (), generator=g))
        image, labels = image[:, oy:oy + self.size, ox:ox + self.size], labels[oy:oy + self.size, ox:ox + self.size]
        pad = (0, self.size - image.shape[2], 0, self.size - image.shape[1])
        return F.pad(image, pad), F.pad(labels, pad, value=IGNORE), 0
