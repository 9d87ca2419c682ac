"""Seeds derived from a run's --seed: one per (epoch, item) for augmentations, one per epoch
for the shuffle of the step sampler, one per generated batch. Each draw can then be
replayed alone (on resume, with any number of processes).

Each mixes its keys as ``seed * stride + key`` with a prime stride larger than any key it
is given, so distinct keys give distinct seeds.
"""
from __future__ import annotations

KEY_STRIDE = 1_000_003  # a prime above any epoch or batch count
INDEX_STRIDE = 2_000_003  # a prime above any dataset's item count (ImageNet-1k train: 1,281,167 images)
SHUFFLE_STRIDE = 7919  # a prime above any epoch count of a training run
MAX_SEED = 2 ** 63  # --seed's range is [0, 2**63)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of item ``index``'s random augmentation in ``epoch``."""
    return (seed * KEY_STRIDE + epoch) * INDEX_STRIDE + index


def shuffle_seed(seed: int, epoch: int) -> int:
    """The seed of the permutation of the data in ``epoch``."""
    return seed * SHUFFLE_STRIDE + epoch


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of generated batch ``batch_index``'s noise, within --seed's range."""
    return (seed * KEY_STRIDE + batch_index) % MAX_SEED
