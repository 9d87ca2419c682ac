"""The ViTDet-style backbone (ViT-B, 1024 px, batch 1, window attention in 8 of 12 blocks)
against the plain global-attention encoder (the same backbone with every block global and no
relative position bias, which the tests hold equal to the ADDP encoder): forward + backward
time in interleaved rounds; the size of one head's attention scores per block is reported
beside it (the memory that windowing saves)."""
import dataclasses
import time

import pytest
import torch

import addp
from addp.models.registry import preset_config
from addp.dense.backbone import ViTDetBackbone, backbone_config_for

pytestmark = pytest.mark.study  # ~1-2 minutes on 2 CPU cores
ROUNDS = 2


def _step(model, x):
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    model(x)[-1].float().square().mean().backward()
    return time.perf_counter() - t


def test_bench_windowed_vs_global_backbone(benchmark, report_ratio):
    cfg = backbone_config_for(preset_config("addp_vit_base_patch16"), 1024, "detection")
    windowed = ViTDetBackbone(cfg)
    plain = ViTDetBackbone(dataclasses.replace(cfg, global_blocks=tuple(range(12)), rel_pos=False))
    x = torch.randn(1, 3, 1024, 1024)
    _step(windowed, x), _step(plain, x)  # warm-up
    times = {"windowed": [], "global": []}
    for _ in range(ROUNDS):
        times["windowed"].append(_step(windowed, x))
        times["global"].append(_step(plain, x))
    benchmark.pedantic(_step, args=(windowed, x), rounds=1, iterations=1)
    w, g = min(times["windowed"]), min(times["global"])
    tokens, window = (1024 // 16) ** 2, 14 * 14
    # attention scores per head of one block: global N^2, windowed 25 windows (64 -> 70 padded) of 196^2
    mem = f"scores/head/block: global {tokens ** 2 * 4 / 2**20:.0f} MiB, windowed {25 * window ** 2 * 4 / 2**20:.1f} MiB"
    report_ratio("ViT-B 1024 px fwd+bwd: windowed (ViTDet) vs global", g / w,
                 f"({w:.2f} s vs {g:.2f} s, {torch.get_num_threads()} threads; {mem})")
    assert w < g
