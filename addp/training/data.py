"""Datasets and the step-indexed sampler that makes training resumable to the bit.

Two sources: an ImageFolder tree (`--data-path`, ImageNet's `train/` as is) and the embedded
default, scikit-learn's handwritten digits (1,797 real 8x8 scans). Every sample is addressed
by (index, epoch) and augmented with a generator seeded from (seed, epoch, index), so the
images of step s are the same whether or not the run was interrupted and resumed.
"""
from __future__ import annotations

import os

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..runs.images import UnreadableImage, read_rgb
from ..errors import AddpError
from ..runtime.seeds import item_seed, shuffle_seed

MAX_CONSECUTIVE_BAD = 20


def default_workers() -> int:
    """Data-loading processes for image folders: 8, or fewer on a machine with fewer cores."""
    return min(8, os.cpu_count() or 1)


def load_digits(split: str = "train", image_size: int = 32, holdout: float = 0.2, seed: int = 0):
    """Digits as RGB images in [0, 1], (N, 3, image_size, image_size), and labels (N,).

    The train/held-out split is a fixed permutation drawn from `seed`.
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8)
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_held = int(round(len(labels) * holdout))
    pick = {"train": order[n_held:], "heldout": order[:n_held], "all": order}[split]
    return images[pick], labels[pick]


class DigitsDataset(Dataset):
    """The embedded digits, already at `image_size`; optional flip (off by default: a
    mirrored digit is another glyph). Items are (image, label, unreadable=0)."""

    def __init__(self, split: str = "train", image_size: int = 32, flip: bool = False, seed: int = 0):
        self.images, self.labels = load_digits(split, image_size)
        self.flip, self.seed = flip, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image = self.images[index]
        if self.flip:
            g = torch.Generator().manual_seed(item_seed(self.seed, epoch, index))
            if torch.rand((), generator=g) < 0.5:
                image = image.flip(-1)
        return image, self.labels[index], 0


class ImageFolderDataset(Dataset):
    """Images under `root/<class>/*.jpg` (or directly under root), as RGB tensors in [0, 1].

    Training transform: RandomResizedCrop(image_size, scale=(crop_min, 1)) + horizontal
    flip. An unreadable or corrupt file (or a decompression bomb, see `images.open_image`) is
    replaced by the next readable one and counted (the third item of each sample), never
    raised mid-epoch; 16-bit and float files are scaled to [0, 1] from their own range.
    """

    def __init__(self, root, image_size: int, crop_min: float = 0.2, flip: bool = True,
                 train: bool = True, seed: int = 0):
        self.root, self.seed = Path(root), seed
        self.samples, self.classes = scan_shared(self.root)
        if train:
            steps = [transforms.RandomResizedCrop(image_size, scale=(crop_min, 1.0),
                                                  interpolation=transforms.InterpolationMode.BICUBIC)]
            steps += [transforms.RandomHorizontalFlip()] if flip else []
        else:
            steps = [transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
                     transforms.CenterCrop(image_size)]
        self.transform = transforms.Compose(steps + [transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        for bad in range(MAX_CONSECUTIVE_BAD):
            path, label = self.samples[(index + bad) % len(self.samples)]
            try:
                img = read_rgb(path)
            except UnreadableImage:
                continue  # truncated, corrupt, not an image, or a decompression bomb
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed(self.seed, epoch, index))
                return self.transform(img), label, bad
        raise AddpError(f"{MAX_CONSECUTIVE_BAD} unreadable images in a row near {self.samples[index][0]}")


def training_folder(path) -> tuple[Path, str | None]:
    """The folder pretraining reads: `path/train` when `path` is a dataset root holding train/
    (ImageNet's layout; its val/ must not leak into training), else `path`; and a line
    saying so (None when `path` is used as is)."""
    root = Path(path)
    if (root / "train").is_dir():
        return root / "train", f"[data] {root} holds train/: training reads {root / 'train'} only"
    return root, None


def scan_shared(root: Path):
    """(samples, classes) of an image folder, scanned once by rank 0 and sent to the other
    ranks (a scan of ImageNet's 1.28M files takes minutes on network storage)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return _scan(root)
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = _scan(root)
        except AddpError as e:
            box[0] = str(e)
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise AddpError(box[0])
    return box[0]


def _scan(root: Path):
    if not root.exists():
        raise AddpError(f"data folder not found: {root}")
    if not root.is_dir():
        raise AddpError(f"data path is not a folder: {root}")
    exts = tuple(IMG_EXTENSIONS)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples = []
    for label, name in enumerate(classes):
        samples += [(str(p), label) for p in sorted((root / name).rglob("*")) if p.suffix.lower() in exts]
    if not classes:  # a flat folder of images
        samples = [(str(p), 0) for p in sorted(root.iterdir()) if p.suffix.lower() in exts]
    if not samples:
        raise AddpError(f"no images in {root} (expected class sub-folders of .jpg/.png files, like ImageNet's train/)")
    return samples, classes or ["images"]


class StepBatchSampler:
    """Yields the (index, epoch) keys of micro-batch k = start, start+1, ... forever.

    Each epoch is a permutation drawn from (seed, epoch); a global batch of
    batch_size * world_size keys is split across ranks (rank r takes every world_size-th).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, start: int = 0):
        self.n, self.batch, self.seed = num_samples, batch_size, seed
        self.rank, self.world, self.start = rank, world_size, start
        self.per_epoch = num_samples // (batch_size * world_size)
        if self.per_epoch == 0:
            raise AddpError(f"{num_samples} images are fewer than one global batch of "
                            f"{batch_size * world_size}; lower --batch-size")

    def batch_keys(self, k: int) -> list[tuple[int, int]]:
        epoch, pos = divmod(k, self.per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(shuffle_seed(self.seed, epoch)))
        span = self.batch * self.world
        chunk = perm[pos * span:(pos + 1) * span][self.rank::self.world]
        return [(int(i), epoch) for i in chunk]

    def __iter__(self):
        k = self.start
        while True:
            yield self.batch_keys(k)
            k += 1


def collate(items):
    images, labels, bad = zip(*items)
    return torch.stack(images), torch.as_tensor(labels), sum(bad)


def make_loader(dataset: Dataset, batch_size: int, seed: int, rank: int, world_size: int,
                start: int, num_workers: int, collate_fn=collate) -> DataLoader:
    """Micro-batch `start` on of `dataset` (`StepBatchSampler`), batched by `collate_fn`."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, rank, world_size, start)
    # Its own generator: creating the iterator must not consume the global RNG (exact resume).
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def with_worker_causes(batches):
    """Iterate `batches`; an error a DataLoader worker raised ("Caught X in DataLoader worker
    process 0." + the worker's traceback) is raised again with the traceback's last line, its
    cause, as the first line: what a one-line error shows."""
    it = iter(batches)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            if len(lines) < 2 or "DataLoader worker" not in lines[0]:
                raise
            cause = lines[-1]
            kind, sep, message = cause.partition(": ")
            if sep and kind.rsplit(".", 1)[-1] == type(e).__name__:
                cause = message  # the type is the one raised here
            where = lines[0].split(" in ", 1)[-1].rstrip(".")
            try:
                again = type(e)(f"{cause} (in {where})")
            except Exception:
                raise e from None
            raise again from e
        yield item

