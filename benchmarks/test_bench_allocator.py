"""The CPU malloc settings (``addp.runtime.tuning.keep_freed_memory``) against glibc's defaults, at the
official layout: a generation step (our default precision for the device) and a training step
(``Trainer.train_step``, our default: fp32 on a CPU), each time in its own process (malloc's
settings belong to a process), the two settings alternating process by process. Prints ms and
page faults per step and each process's peak resident memory with
``python -m pytest -s benchmarks/test_bench_allocator.py``; ADDP_BENCH_ROUNDS sets the processes
per setting (default 3).

Run as a script (``python benchmarks/test_bench_allocator.py generation|training``) it is one
such process: it prints one JSON line.
"""
import json
import os
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import presets as P  # noqa: E402

pytestmark = pytest.mark.study  # not in the default selection: --studies, -m study, or name this file

ROUNDS = int(os.environ.get("ADDP_BENCH_ROUNDS", 3))
STEPS = {"generation": 8, "training": 4}


def _generation(preset: str) -> dict:
    from addp.runtime.precision import precision_context
    from addp.sampling import SamplerConfig, sample_batch
    net, tok, _ = P.build(preset)
    config = SamplerConfig(steps=STEPS["generation"])
    with torch.no_grad(), precision_context("auto", P.DEVICE):
        sample_batch(net, tok, P.batch_size(preset), config)  # warm-up
        run = P.timed_calls(lambda: sample_batch(net, tok, P.batch_size(preset), config), 1)
    return _per_step(run, STEPS["generation"])


def _training(preset: str) -> dict:
    _, tok, pred = P.build(preset)
    trainer, batches = P.trainer_and_batches(preset, tok, pred)
    trainer.train_step(batches)  # warm-up
    return P.timed_calls(lambda: trainer.train_step(batches), STEPS["training"])


def _per_step(run: dict, steps: int) -> dict:
    return {**run, "seconds": run["seconds"] / steps, "faults": run["faults"] / steps}


def _worker(kind: str, system: bool) -> dict:
    return P.run_process(__file__, kind, env={"ADDP_MALLOC": "system" if system else "auto"})


@pytest.mark.skipif(P.DEVICE.type != "cpu", reason="the malloc settings are CPU-only")
@pytest.mark.parametrize("kind", ["generation", "training"])
def test_bench_malloc_settings(report_ratio, kind):
    from addp.runtime.tuning import _glibc
    if _glibc() is None:
        pytest.skip("the malloc settings apply to glibc only")
    preset = P.presets()[-1]
    runs = {True: [], False: []}
    for _ in range(ROUNDS):
        for system in (True, False):
            runs[system].append(_worker(kind, system))
    ms = {s: statistics.median(r["seconds"] for r in runs[s]) * 1e3 for s in runs}
    faults = {s: statistics.median(r["faults"] for r in runs[s]) for s in runs}
    peak = {s: statistics.median(r["peak_rss_mib"] for r in runs[s]) for s in runs}
    print(f"\n{kind} step, {preset} layout, B={P.batch_size(preset)}, cpu, {torch.get_num_threads()} threads "
          f"(median of {ROUNDS} processes per setting)")
    print("| malloc | ms / step (range) | page faults / step | peak RSS MiB |\n|---|---|---|---|")
    for system, label in ((True, "glibc defaults (ADDP_MALLOC=system)"), (False, "addp.runtime.tuning settings")):
        spread = [r["seconds"] * 1e3 for r in runs[system]]
        print(f"| {label} | {ms[system]:.1f} ({min(spread):.1f}-{max(spread):.1f}) | {faults[system]:,.0f} "
              f"| {peak[system]:.0f} |")
    report_ratio(f"{kind} step {preset}: malloc settings vs glibc defaults", ms[True] / ms[False],
                 f"({ms[True]:.1f} vs {ms[False]:.1f} ms/step, page faults/step {faults[True]:,.0f} vs "
                 f"{faults[False]:,.0f})")
    assert faults[False] < faults[True], "the settings did not reduce page faults"


if __name__ == "__main__":
    print(json.dumps((_generation if sys.argv[1] == "generation" else _training)(P.presets()[-1])))
