"""End-to-end speed: our sampler and training step vs the official-style reference loop
(benchmarks/reference_loop.py) on the same models, in the same run (pytest benchmarks/).

Model sets and precision modes are those of benchmarks/presets.py: on a CPU the small demo
presets (batch 32) and the official 256 px / 16x16-token layout at CPU widths (batch 2), each
in fp32 on both sides and at each side's device default; on a GPU ADDP ViT-B/16 + MAGE VQGAN
+ MAGE ViT-B, bf16, batch 64. 20 steps. Random weights: speed does not depend on them.
The torch.compile variants are studies (marker ``study``: ``--studies``, ``-m study``, or this
file named on the command line); they run for the small presets and on GPUs (ADDP_BENCH_COMPILE=1
adds them for the official layout on a CPU, where compiling the 256 px decoder takes minutes).
ADDP_BENCH_ROUNDS sets the number of interleaved rounds. Each ratio (reference median / ours)
is checked against its floor in benchmarks/floors.csv.

Rounds of ours and of the reference are interleaved and the medians compared, so load from
other processes hits both alike; the ratios of the rounds' adjacent pairs (median, min-max)
are printed beside it. Times are wall-clock with the device synchronised; on a GPU
the training step also reports model FLOPs (torch.utils.flop_counter) and MFU against the
bf16 dense peak of the GPU (ADDP_PEAK_TFLOPS overrides the table below).
"""
import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from addp import sampling as S
from addp.runtime.distributed import DistInfo
from addp.training.stages import ADDPStage
from addp.training.config import TrainConfig
from addp.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
import presets as P  # noqa: E402
import reference_loop as R  # noqa: E402

DEVICE = P.DEVICE
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}  # bf16 dense
ROUNDS = {"small": (3, 5), "official": (2, 3), "base": (10, 20)}  # (generation, training step)
if os.environ.get("ADDP_BENCH_ROUNDS"):
    ROUNDS = {k: (int(os.environ["ADDP_BENCH_ROUNDS"]),) * 2 for k in ROUNDS}


def peak_flops():
    if DEVICE.type != "cuda":
        return None
    if os.environ.get("ADDP_PEAK_TFLOPS"):
        return float(os.environ["ADDP_PEAK_TFLOPS"]) * 1e12
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def _compile_params():
    heavy = DEVICE.type == "cpu" and os.environ.get("ADDP_BENCH_COMPILE") != "1"
    skip = pytest.mark.skip("compile at the official layout on a CPU: ADDP_BENCH_COMPILE=1")
    return [pytest.param(preset, compile, id=f"{preset}-{'compile' if compile else 'eager'}",
                         marks=([pytest.mark.study] if compile else [])
                         + ([skip] if compile and heavy and preset == "official" else []))
            for preset in P.presets() for compile in (False, True)]


_MODELS = {}


def models(preset):
    if preset not in _MODELS:
        _MODELS.clear()  # one model set in memory at a time
        _MODELS[preset] = P.build(preset)
    return _MODELS[preset]


# --------------------------------------------------------------------------- generation
@pytest.mark.parametrize("precision", P.precisions())
@pytest.mark.parametrize("preset,compile", _compile_params())
def test_bench_generation(benchmark, report_ratio, slow_ours, preset, compile, precision):
    """Images/s of one batch of T steps. Both sides keep the official last step (parity=True)
    so they do the same work; ours replays a CUDA graph on a GPU, runs eager on the CPU, and
    with ``compile`` compiles the ADDP network and the tokenizer's decoder."""
    net, tok, _ = models(preset)
    B, T = P.batch_size(preset), P.STEPS
    ref_amp, our_amp = P.amp_dtypes(precision)
    config = S.SamplerConfig(steps=T, parity=True)

    def ours(cuda_graph=None):
        @slow_ours
        def run():
            with P.autocast(our_amp):
                S.generate(net, tok, B, config, generator=torch.Generator(DEVICE).manual_seed(0),
                           cuda_graph=cuda_graph, compile=compile)
        return run

    def reference():
        R.generate(net, tok, B, T, seed=0, amp_dtype=ref_amp)

    label = f"{precision} (ours {P.our_precision(precision)}, reference {_name(ref_amp)})"
    benchmark.group = f"generation {preset} B={B} T={T} {label} {DEVICE.type}"
    benchmark.pedantic(ours(), rounds=1 if preset == "official" else 2, iterations=1, warmup_rounds=0)
    fns = [reference, ours()] + ([ours(cuda_graph=False)] if DEVICE.type == "cuda" else [])
    rounds = P.interleaved_times(fns, ROUNDS[preset][0])
    times = [statistics.median(ts) for ts in rounds]
    ref_s, our_s = times[:2]
    detail = (f"(reference {B / ref_s:.2f} img/s, ours {B / our_s:.2f} img/s, B={B} T={T}, {label}, "
              f"{DEVICE.type}, {torch.get_num_threads()} threads; paired {P.paired_ratio(*rounds[:2])})")
    benchmark.extra_info.update(reference_img_s=B / ref_s, ours_img_s=B / our_s, speedup=ref_s / our_s)
    report_ratio(f"generation {preset} {precision} ({'compiled' if compile else 'eager'})", ref_s / our_s, detail)
    if DEVICE.type == "cuda":
        eager_s = times[2]
        benchmark.extra_info.update(ours_eager_img_s=B / eager_s)
        report_ratio(f"generation {preset}: CUDA-graph replay vs our eager sampler", eager_s / our_s,
                     f"(eager {B / eager_s:.1f} img/s, graph {B / our_s:.1f} img/s)", part="graph-vs-eager")


def _name(dtype):
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# --------------------------------------------------------------------------- training
def _batches(images):
    labels = torch.zeros(images.shape[0], dtype=torch.long)
    while True:
        yield images, labels, 0


@pytest.mark.parametrize("precision", P.precisions())
@pytest.mark.parametrize("preset,compile", _compile_params())
def test_bench_training_step(benchmark, report_ratio, slow_ours, preset, compile, precision):
    """Images/s of one optimizer step (frozen tokenizer + predictor passes, ADDP forward and
    backward, clipping, AdamW), ours (Trainer.train_step) vs the reference TrainStep."""
    _, tok, pred = models(preset)
    B = P.batch_size(preset)
    ref_amp, _ = P.amp_dtypes(precision, training=True)
    ours_precision = P.our_precision(precision, training=True)
    torch.manual_seed(0)
    size = pred.config.seq_len ** 0.5 * tok.config.stride
    images = torch.rand(B, 3, int(size), int(size), device=DEVICE)
    ref_step = R.TrainStep(P.new_network(preset), tok, pred, amp_dtype=ref_amp)
    trainer = Trainer(ADDPStage(P.new_network(preset), tok, pred),
                      TrainConfig(steps=10 ** 6, batch_size=B, precision=ours_precision, compile=compile),
                      Path(tempfile.mkdtemp()), DistInfo(device=DEVICE), {})
    batches = _batches(images)
    for _ in range(4 if compile else 1):  # compile: settle the dynamic-shape recompilations first
        trainer.train_step(batches)

    @slow_ours
    def ours():
        trainer.train_step(batches)

    def reference():
        ref_step(images)

    label = f"{precision} (ours {ours_precision}, reference {_name(ref_amp)})"
    benchmark.group = f"training step {preset} B={B} {label} {DEVICE.type}"
    benchmark.pedantic(ours, rounds=1 if preset == "official" else 3, iterations=1, warmup_rounds=0)
    rounds = P.interleaved_times([reference, ours], ROUNDS[preset][1])
    ref_s, our_s = (statistics.median(ts) for ts in rounds)
    detail = (f"(reference {B / ref_s:.2f} img/s, ours {B / our_s:.2f} img/s, B={B}, {label}, "
              f"{DEVICE.type}, {torch.get_num_threads()} threads; paired {P.paired_ratio(*rounds)})")
    if DEVICE.type == "cuda":
        flops = _step_flops(trainer, batches, preset)
        peak = peak_flops()
        detail += f" {flops / our_s / 1e12:.2f} TFLOP/s"
        benchmark.extra_info.update(step_tflop=flops / 1e12)
        if peak:
            detail += f", MFU {flops / our_s / peak:.1%} of {peak / 1e12:.0f} TFLOP/s"
            benchmark.extra_info.update(mfu=flops / our_s / peak)
    benchmark.extra_info.update(reference_img_s=B / ref_s, ours_img_s=B / our_s, speedup=ref_s / our_s)
    report_ratio(f"training step {preset} {precision} ({'compiled' if compile else 'eager'})", ref_s / our_s, detail)


def _step_flops(trainer, batches, preset):
    """FLOPs of one whole training step (frozen passes included), counted on an eager copy
    of the trainer's stage (compiled code is invisible to the counter)."""
    from torch.utils.flop_counter import FlopCounterMode
    stage = trainer.stage
    eager = Trainer(ADDPStage(P.new_network(preset), stage.process.tokenizer, stage.process.predictor),
                    dataclasses.replace(trainer.cfg, compile=False), trainer.out, trainer.dist, {})
    with FlopCounterMode(display=False) as counter:
        eager.train_step(batches)
    return counter.get_total_flops()
