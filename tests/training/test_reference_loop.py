"""The benchmark baseline (benchmarks/reference_loop.py) must compute what our network
computes: its official-style forward differs only in where the work is done."""
import sys
from pathlib import Path

import torch

import addp

sys.path.append(str(Path(__file__).parents[2] / "benchmarks"))  # after tests/: benchmarks has a conftest too
import reference_loop as R  # noqa: E402


def test_official_style_forward_equals_ours():
    torch.manual_seed(0)
    net = addp.create_model("addp_vit_small").eval()
    B, L, K = 3, net.config.num_patches, net.config.codebook_size
    images = torch.rand(B, 3, net.config.image_size, net.config.image_size)
    ids = torch.randint(0, K, (B, L))
    for num_reliable in (0, 17, L):
        mask = torch.ones(B, L, dtype=torch.bool)
        for b in range(B):
            mask[b, torch.randperm(L)[:num_reliable]] = False
        with torch.no_grad():
            ours = net(images, ids, mask, num_reliable)
            reference = R._forward(net, images, ids, mask)
        assert ours.shape == reference.shape == (B, L, net.config.vocab_size)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
