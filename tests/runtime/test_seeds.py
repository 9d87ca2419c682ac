"""addp.runtime.seeds: distinct keys give distinct seeds, within what torch and --seed accept."""
import itertools

import torch

from addp.runtime.seeds import MAX_SEED, batch_seed, item_seed, shuffle_seed


def test_distinct_keys_give_distinct_seeds():
    items = {item_seed(s, e, i) for s, e, i in itertools.product(range(3), (0, 1, 999), (0, 1, 1_281_166))}
    assert len(items) == 3 * 3 * 3
    assert len({shuffle_seed(s, e) for s, e in itertools.product(range(4), range(50))}) == 4 * 50
    assert len({batch_seed(s, b) for s, b in itertools.product(range(4), range(1000))}) == 4 * 1000


def test_batch_seeds_stay_in_the_seed_range_and_seed_a_generator():
    for seed in (0, 1, MAX_SEED - 1):
        s = batch_seed(seed, 12345)
        assert 0 <= s < MAX_SEED
        torch.Generator().manual_seed(s)
