"""The ViTDet-style backbone (ViT-B, 1024 px, batch 1, window attention in 8 of 12 blocks,
relative position bias in all) against the plain global-attention encoder (every block global,
no relative position bias: the ADDP encoder, as the tests hold), and the windowed backbone
without the bias between them: forward + backward time in interleaved rounds, and the peak
resident memory (VmHWM) of one forward + backward of each, each in a fresh process."""
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from addp.models.registry import preset_config
from addp.dense.backbone import ViTDetBackbone, backbone_config_for

pytestmark = pytest.mark.study  # ~2-3 minutes on 2 CPU cores
ROUNDS = 2
VARIANTS = ("windowed", "windowed-no-bias", "global")

_PEAK = """
import json, sys, torch
sys.path.insert(0, {here!r})
from test_bench_dense import backbone, step

def high_water_mib():  # VmHWM restarts at exec, unlike ru_maxrss, which keeps the parent's
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024

model = backbone(sys.argv[1])
alone = high_water_mib()
step(model, torch.randn(1, 3, 1024, 1024))
print(json.dumps({{"peak_mib": high_water_mib(), "model_mib": alone}}))
"""


def backbone(variant: str) -> ViTDetBackbone:
    cfg = backbone_config_for(preset_config("addp_vit_base_patch16"), 1024, "detection")
    if variant == "global":
        cfg = dataclasses.replace(cfg, global_blocks=tuple(range(12)), rel_pos=False)
    elif variant == "windowed-no-bias":
        cfg = dataclasses.replace(cfg, rel_pos=False)
    return ViTDetBackbone(cfg)


def step(model, x) -> float:
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    model(x)[-1].float().square().mean().backward()
    return time.perf_counter() - t


def peak_memory(variant: str) -> dict:
    """Peak resident memory (MiB) of one forward + backward of `variant`, in a process of its own."""
    code = _PEAK.format(here=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code, variant], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bench_windowed_vs_global_backbone(benchmark, report_ratio):
    models = {v: backbone(v) for v in VARIANTS}
    x = torch.randn(1, 3, 1024, 1024)
    for model in models.values():
        step(model, x)  # warm-up
    times = {v: [] for v in VARIANTS}
    for _ in range(ROUNDS):
        for v in VARIANTS:
            times[v].append(step(models[v], x))
    benchmark.pedantic(step, args=(models["windowed"], x), rounds=1, iterations=1)
    best = {v: min(ts) for v, ts in times.items()}
    peak = {v: peak_memory(v) for v in VARIANTS}
    benchmark.extra_info.update({f"{v}_peak_mib": p["peak_mib"] for v, p in peak.items()})
    benchmark.extra_info.update({f"{v}_s": t for v, t in best.items()})
    mem = ", ".join(f"{v} {p['peak_mib']:.0f} MiB (model alone {p['model_mib']:.0f})" for v, p in peak.items())
    seconds = ", ".join(f"{v} {t:.2f} s" for v, t in best.items())
    detail = f"({seconds}; {torch.get_num_threads()} threads; peak resident memory {mem})"
    report_ratio("ViT-B 1024 px fwd+bwd: windowed (ViTDet) vs global", best["global"] / best["windowed"], detail)
    report_ratio("ViT-B 1024 px fwd+bwd: windowed without the bias vs global",
                 best["global"] / best["windowed-no-bias"], detail, part="no-bias")
