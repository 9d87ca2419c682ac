"""Compile time of the trainer's ``--compile`` step as the count of reliable tokens changes from
step to step: ours (size-oblivious shapes, ``Trainer._compile_shapes``) against torch.compile's
default shape reasoning, which keeps the counts 0 and 1 out of its dynamic graph and compiles
each again the first time a step draws it.

Each side runs in processes of its own with inductor's caches off (a cached graph would hide
its compile), alternating, ADDP_BENCH_ROUNDS per side (default 1). The steps keep `counts(L)` of
the L tokens reliable: the first compiles a graph for its shapes, the second the dynamic one,
then 0 and 1, then a count seen before. Prints the seconds of every step and the ratio of the
totals: ``python -m pytest -s benchmarks/test_bench_compile.py`` (the small preset; the
official layout with ADDP_BENCH_COMPILE=1, minutes per process on a CPU). Run as a script
(``python benchmarks/test_bench_compile.py PRESET SIDE``) it is one such process.
"""
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import presets as P  # noqa: E402

pytestmark = pytest.mark.study  # not in the default selection: --studies, -m study, or name this file

ROUNDS = int(os.environ.get("ADDP_BENCH_ROUNDS", 1))
SIDES = ("torch default", "ours")
NO_CACHE = {"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}


def counts(L: int) -> list[int]:
    return [3 * L // 8, L // 4, 0, 1, L // 8, 3 * L // 8]


def _steps(preset: str, side: str) -> dict:
    from addp.training.trainer import Trainer
    if side == "torch default":
        Trainer._compile_shapes = lambda self: contextlib.nullcontext()
    _, tok, pred = P.build(preset)
    trainer, batches = P.trainer_and_batches(preset, tok, pred, compile=True)
    stage = trainer.stage
    prepare = stage.prepare
    steps = counts(pred.config.seq_len)
    seconds = []
    for reliable in steps:
        def keep_reliable(images, generator, labels=None, reliable=reliable):
            inputs = prepare(images, generator, labels)
            B, L = inputs["ids"].shape
            keep = torch.rand(B, L, generator=generator).argsort(1).argsort(1) < reliable
            return {**inputs, "mask": (~keep).to(inputs["mask"].device), "num_reliable": reliable}
        stage.prepare = keep_reliable
        start = time.perf_counter()
        trainer.train_step(batches)
        P.sync()
        seconds.append(time.perf_counter() - start)
    return {"counts": steps, "L": pred.config.seq_len, "seconds": seconds}


def _params():
    heavy = P.DEVICE.type == "cpu" and os.environ.get("ADDP_BENCH_COMPILE") != "1"
    skip = pytest.mark.skip("compile at the official layout on a CPU: ADDP_BENCH_COMPILE=1")
    return [pytest.param(preset, marks=[skip] if heavy and preset == "official" else []) for preset in P.presets()]


@pytest.mark.parametrize("preset", _params())
def test_bench_compiled_training_steps(report_ratio, preset):
    runs = {side: [] for side in SIDES}
    for _ in range(ROUNDS):
        for side in SIDES:
            run = P.run_process(__file__, preset, side, env=NO_CACHE, timeout=3600)
            runs[side].append(run["seconds"])
    steps = [list(map(statistics.median, zip(*rs))) for rs in runs.values()]
    L, reliable = run["L"], run["counts"]
    print(f"\ncompiled training steps, {preset} layout, B={P.batch_size(preset)}, {P.DEVICE.type}, "
          f"{torch.get_num_threads()} threads, inductor caches off (median of {ROUNDS} processes, s)")
    print("| reliable tokens | " + " | ".join(SIDES) + " |\n|---|---|---|")
    for i, count in enumerate(reliable):
        print(f"| {count} of {L} | " + " | ".join(f"{s[i]:.1f}" for s in steps) + " |")
    totals = [sum(s) for s in steps]
    print("| all steps | " + " | ".join(f"{t:.1f}" for t in totals) + " |")
    report_ratio(f"compiled training steps {preset}, counts {reliable}", totals[0] / totals[1],
                 f"(torch default {totals[0]:.1f} s, ours {totals[1]:.1f} s)")
    # 0 and 1 compile nothing new for ours
    assert max(steps[1][2:]) < steps[1][1], steps[1]


if __name__ == "__main__":
    print(json.dumps(_steps(*sys.argv[1:3])))
