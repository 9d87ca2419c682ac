"""Datasets. The embedded default: scikit-learn's handwritten digits (1,797 real 8x8 scans)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
