"""The data of `addp.finetune`: the digits with random shifts, ImageFolder trees with timm's
training transform (seeded per image for exact resume), and few-labels subsets."""
from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import create_transform
from torch.utils.data import Dataset

from .data import DigitsDataset, ImageFolderDataset
from ..runtime.seeds import item_seed
from ..models.addp import IMAGENET_MEAN, IMAGENET_STD
from ..errors import AddpError


# -- data ------------------------------------------------------------------------------------
# added to --seed for the shift draws, so that they differ from the base dataset's flip
# draws of the same (epoch, item)
SHIFT_SEED_OFFSET = 17


class ShiftedDigits(Dataset):
    """Digits with a random shift of up to `shift` pixels (zero padding), drawn per (epoch, index)."""

    def __init__(self, base: DigitsDataset, shift: int, seed: int):
        self.base, self.shift, self.seed = base, shift, seed
        self.labels = base.labels

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image, label, bad = self.base[key]
        if self.shift:
            g = torch.Generator().manual_seed(item_seed(self.seed + SHIFT_SEED_OFFSET, epoch, index))
            dy, dx = torch.randint(0, 2 * self.shift + 1, (2,), generator=g).tolist()
            s, (h, w) = self.shift, image.shape[-2:]
            image = F.pad(image, (s, s, s, s))[:, dy:dy + h, dx:dx + w]
        return image, label, bad



class SeededTimmTransform:
    """timm's training transform (RandAugment, random erasing, ...) returning images in [0, 1].

    timm draws from Python's `random`; it is seeded from torch's RNG, which ImageFolderDataset
    seeds per (epoch, index), so augmentations repeat exactly on resume."""

    def __init__(self, image_size: int, aa: str | None, reprob: float, probe: bool = False):
        # a probe: RandomResizedCrop + flip only (no colour jitter either), paper Tab. 16
        self.transform = create_transform(image_size, is_training=True, auto_augment=aa or None, re_prob=reprob,
                                          re_mode="pixel", re_count=1, interpolation="bicubic",
                                          color_jitter=None if probe else 0.4,
                                          mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, img):
        state = random.getstate()
        random.seed(int(torch.randint(2 ** 62, ())))
        try:
            x = self.transform(img)
        finally:
            random.setstate(state)
        return x * self.std + self.mean  # the classifier normalises its input itself



class Subset(Dataset):
    """The items `indices` of a dataset addressed by (index, epoch) keys."""

    def __init__(self, base: Dataset, indices: list[int]):
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        return self.base[(self.indices[index], epoch)]



def labels_of(dataset) -> list[int]:
    if hasattr(dataset, "labels"):
        return [int(x) for x in dataset.labels]
    return [label for _, label in dataset.samples]



def per_class_subset(labels: list[int], n: int, seed: int) -> list[int]:
    """The first `n` images of each class in a permutation drawn from `seed` (sorted)."""
    if n < 1:
        raise AddpError(f"--labels-per-class must be at least 1, got {n}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed + 99)).tolist()
    taken: dict[int, int] = {}
    pick = []
    for i in order:
        if taken.get(labels[i], 0) < n:
            taken[labels[i]] = taken.get(labels[i], 0) + 1
            pick.append(i)
    return sorted(pick)



def build_datasets(args, image_size: int):
    """(train, val, num_classes)."""
    if args.data_path:
        root = Path(args.data_path)
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise AddpError(f"{root} has no {split}/ folder (expected {root}/train/<class>/*.jpg "
                                f"and {root}/val/<class>/*.jpg)")
        train = ImageFolderDataset(root / "train", image_size, seed=args.seed)
        train.transform = SeededTimmTransform(image_size, args.aa, args.reprob, args.linear_probe)
        val = ImageFolderDataset(root / "val", image_size, train=False)
        if train.classes != val.classes:
            raise AddpError(f"train/ has {len(train.classes)} classes and val/ has {len(val.classes)}: they must match")
        num_classes = len(train.classes)
    else:
        train = ShiftedDigits(DigitsDataset("train", image_size), args.shift, args.seed)
        val = DigitsDataset("heldout", image_size)
        num_classes = 10
    if args.labels_per_class:
        train = Subset(train, per_class_subset(labels_of(train), args.labels_per_class, args.seed))
    return train, val, num_classes



def _collate(items):
    images, labels, _ = zip(*items)
    return torch.stack(images), torch.as_tensor(labels)
