"""The model sets and precisions the benchmarks run at (shared by the benchmark files).

  small     the CPU demo presets: 32 px, 8x8 tokens (addp_vit_small, vqgan_small, mage_vit_small)
  official  the official layout at CPU widths: 256 px, 16x16 tokens, MAGE's VQGAN architecture
            (ch_mult 1,1,2,2,4, two residual blocks per level) at ch=32, and ViT-B/16-shaped ADDP
            and MAGE networks (12 encoder + 8 decoder blocks) at width 192. Every width is 1/4
            of the real one, so every part keeps its share of the multiply-adds.
  base      the real thing (GPU): ADDP ViT-B/16 + MAGE VQGAN + MAGE ViT-B at 256 px

Precision modes (``precisions()``):
  fp32      both sides in fp32
  bf16      both sides under bf16 autocast
  default   each side at its default for the device: the reference at the official code's
            (fp32 on a CPU, where its torch.cuda.amp.autocast does nothing; fp16 autocast on a
            GPU), ours at ``--precision auto`` (addp.runtime.precision.resolve_precision; for training
            that is fp32 on a CPU)
  bf16-ours the reference at its default, ours under bf16 autocast (``--precision bf16``):
            the training step on a CPU with native bf16, where training's ``auto`` stays fp32

Environment: ADDP_BENCH_PRESET (comma list; default small,official on a CPU, base on a GPU),
ADDP_BENCH_PRECISION (comma list; default fp32,default on a CPU, bf16 on a GPU),
ADDP_BENCH_BATCH, ADDP_BENCH_STEPS; ADDP_BENCH_SMOKE=1 (set by ``pytest --smoke``): one round,
no warm-up (``rounds``, ``warmups``); ADDP_BENCH_ROUNDS sets the rounds of the op benchmarks too.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import addp
from addp.runtime.precision import autocast_dtype, resolve_precision
from addp.runtime.tuning import tune_for_device

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
tune_for_device(DEVICE)  # as the CLIs: cuDNN autotuning (as the official scripts), CPU malloc settings

_VIT_192 = dict(embed_dim=192, num_heads=3, decoder_embed_dim=192, decoder_num_heads=4)
PRESETS = {
    "small": (("addp_vit_small", {}), ("vqgan_small", {}), ("mage_vit_small", {})),
    "official": (("addp_vit_base_patch16", _VIT_192), ("vqgan_mage", dict(ch=32)),
                 ("mage_vit_base_patch16", _VIT_192)),
    "base": (("addp_vit_base_patch16", {}), ("vqgan_mage", {}), ("mage_vit_base_patch16", {})),
}
BATCH = {"small": 32, "official": 2, "base": 64}
STEPS = int(os.environ.get("ADDP_BENCH_STEPS", 20))
SMOKE = os.environ.get("ADDP_BENCH_SMOKE") == "1"


def rounds(n: int) -> int:
    """``n`` rounds (ADDP_BENCH_ROUNDS overrides), or one in a smoke run."""
    return 1 if SMOKE else int(os.environ.get("ADDP_BENCH_ROUNDS", n))


def warmups(n: int) -> int:
    """``n`` warm-up calls, or none in a smoke run."""
    return 0 if SMOKE else n


def _env_list(name: str, default: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, default).split(",") if v.strip()]


def presets() -> list[str]:
    return _env_list("ADDP_BENCH_PRESET", "base" if DEVICE.type == "cuda" else "small,official")


def precisions() -> list[str]:
    return _env_list("ADDP_BENCH_PRECISION", "bf16" if DEVICE.type == "cuda" else "fp32,default")


def batch_size(preset: str) -> int:
    return int(os.environ.get("ADDP_BENCH_BATCH", BATCH[preset]))


def build(preset: str, seed: int = 0):
    """(addp network, tokenizer, predictor) of ``preset`` on DEVICE, in eval mode."""
    torch.manual_seed(seed)
    return tuple(addp.create_model(name, **kw).to(DEVICE).eval() for name, kw in PRESETS[preset])


def new_network(preset: str) -> torch.nn.Module:
    name, kw = PRESETS[preset][0]
    return addp.create_model(name, **kw).to(DEVICE)


def amp_dtypes(mode: str, training: bool = False) -> tuple:
    """(reference autocast dtype, our autocast dtype) of a precision mode (None: fp32)."""
    official = torch.float16 if DEVICE.type == "cuda" else None
    if mode == "default":
        return official, autocast_dtype("auto", DEVICE, training)
    if mode == "bf16-ours":
        return official, torch.bfloat16
    dtype = {"fp32": None, "bf16": torch.bfloat16}[mode]
    return dtype, dtype


def our_precision(mode: str, training: bool = False) -> str:
    """Our --precision value of a mode, as a name (for the Trainer and for labels)."""
    if mode == "default":
        return resolve_precision("auto", DEVICE, training)
    return "bf16" if mode == "bf16-ours" else mode


def autocast(dtype):
    return torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype is not None)


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def interleaved_times(fns, rounds: int, warmup: int = 1) -> list[list[float]]:
    """Wall times (s) of each fn over ``rounds`` rounds, calling them in turn each round, so
    that load from other processes hits them alike (smoke run: one round, no warm-up)."""
    times = [[] for _ in fns]
    rounds, warmup = (1, 0) if SMOKE else (rounds, warmup)
    for i in range(warmup + rounds):
        for fn, ts in zip(fns, times):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                ts.append(time.perf_counter() - t0)
    return times


def paired_ratio(ref_times: list[float], our_times: list[float]) -> str:
    """Round-by-round ratios (reference / ours, each round's two runs adjacent in time, so a
    load that drifts over the run hits both alike): "median (min-max) over n rounds"."""
    ratios = sorted(r / o for r, o in zip(ref_times, our_times))
    return f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f}) over {len(ratios)} rounds"


def trainer_and_batches(preset: str, tok, pred, precision: str = "auto", compile: bool = False):
    """(Trainer of a fresh ADDP network of ``preset``, an endless iterator of one random image
    batch) for timing ``trainer.train_step(batches)``."""
    from addp.runtime.distributed import DistInfo
    from addp.training.stages import ADDPStage
    from addp.training.config import TrainConfig
    from addp.training.trainer import Trainer
    B = batch_size(preset)
    size = tok.config.stride * int(pred.config.seq_len ** 0.5)
    images = torch.rand(B, 3, size, size, device=DEVICE)
    config = TrainConfig(steps=10 ** 6, batch_size=B, precision=precision, compile=compile)
    trainer = Trainer(ADDPStage(new_network(preset), tok, pred), config, Path(tempfile.mkdtemp()),
                      DistInfo(device=DEVICE), {})
    return trainer, iter(lambda: (images, torch.zeros(B, dtype=torch.long), 0), None)


# --------------------------------------------------------------------------- one process per run
def timed_calls(fn, calls: int) -> dict:
    """Run ``fn`` ``calls`` times: seconds and minor page faults per call, and this process's
    peak resident memory (MiB)."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": seconds / calls, "faults": (usage.ru_minflt - faults) / calls,
            "peak_rss_mib": usage.ru_maxrss / 1024}  # ru_maxrss is in KiB on Linux


def run_process(script: str, *args: str, env: dict | None = None, timeout: float = 1800) -> dict:
    """``python script *args`` (a benchmark run as one process) with ``env`` added to this
    process's environment; returns the JSON object on its last stdout line."""
    out = subprocess.run([sys.executable, script, *args], env={**os.environ, **(env or {})},
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"{Path(script).name} {' '.join(args)} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
