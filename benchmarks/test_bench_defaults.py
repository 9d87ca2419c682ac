"""Each side at its own defaults on a CPU, each run in its own process: ours as the commands
run it (``addp.runtime.tuning``'s malloc settings; generation at ``--precision auto``, bf16 where the
CPU has it natively; the training step at ``--precision bf16`` where bf16 is native, as the
``bf16-ours`` mode of test_bench_e2e.py, else at its ``auto``, fp32), against the official-style loop (benchmarks/reference_loop.py) as the
official code runs on a CPU (glibc's malloc defaults, ``ADDP_MALLOC=system``; fp32, which its
``torch.cuda.amp.autocast`` leaves on a CPU). test_bench_e2e.py compares the two in one
process, so under the same malloc settings; the process-wide settings of each side differ
only here.

Official layout (benchmarks/presets.py), batch 2: a 20-step generation (parity last step on
both sides) and a training step, ours eager and compiled. Processes of the variants alternate,
ADDP_BENCH_ROUNDS per variant (default 3); each times its calls after a warm-up.
``python -m pytest -s benchmarks/test_bench_defaults.py`` prints the table. Run as a script
(``python benchmarks/test_bench_defaults.py KIND SIDE``) it is one such process.
"""
import json
import os
import statistics
import sys
from pathlib import Path

import pytest
import torch

from addp.runtime.precision import native_bf16

sys.path.insert(0, str(Path(__file__).parent))
import presets as P  # noqa: E402

pytestmark = pytest.mark.study  # not in the default selection: --studies, -m study, or name this file

ROUNDS = int(os.environ.get("ADDP_BENCH_ROUNDS", 3))
PRESET = "official"
SIDES = {"reference": {"ADDP_MALLOC": "system"}, "ours": {}, "ours-compiled": {}}
CALLS = {"generation": 2, "training": 4}
WARMUP = {"generation": 1, "training": 1, "training-compiled": 5}  # compiled: settle the recompilations


def _generation(side: str) -> dict:
    import reference_loop as R
    from addp import sampling as S
    net, tok, _ = P.build(PRESET)
    B = P.batch_size(PRESET)
    if side == "reference":
        def run():
            R.generate(net, tok, B, P.STEPS, seed=0)
    else:
        config = S.SamplerConfig(steps=P.STEPS, parity=True)

        def run():
            S.generate(net, tok, B, config, generator=torch.Generator().manual_seed(0),
                       compile=side == "ours-compiled", precision="auto")
    run()
    return P.timed_calls(run, CALLS["generation"])


def _training(side: str) -> dict:
    import reference_loop as R
    _, tok, pred = P.build(PRESET)
    if side == "reference":
        step = R.TrainStep(P.new_network(PRESET), tok, pred)
        images = torch.rand(P.batch_size(PRESET), 3, tok.config.image_size, tok.config.image_size)

        def run():
            step(images)
    else:
        precision = "bf16" if native_bf16(P.DEVICE) else "auto"
        trainer, batches = P.trainer_and_batches(PRESET, tok, pred, precision, compile=side == "ours-compiled")

        def run():
            trainer.train_step(batches)
    for _ in range(WARMUP["training-compiled" if side == "ours-compiled" else "training"]):
        run()
    return P.timed_calls(run, CALLS["training"])


@pytest.mark.skipif(P.DEVICE.type != "cpu", reason="on GPUs the two sides' process settings agree")
@pytest.mark.parametrize("kind", ["generation", "training"])
def test_bench_each_side_at_its_defaults(report_ratio, kind):
    runs = {side: [] for side in SIDES}
    for _ in range(ROUNDS):
        for side, env in SIDES.items():
            runs[side].append(P.run_process(__file__, kind, side, env=env))
    B = P.batch_size(PRESET)
    seconds = {side: statistics.median(r["seconds"] for r in rs) for side, rs in runs.items()}
    what = f"{P.STEPS}-step generation of a batch" if kind == "generation" else "training step"
    print(f"\n{what}, {PRESET} layout, B={B}, cpu, {torch.get_num_threads()} threads, each side at its "
          f"defaults (median of {ROUNDS} processes)")
    print("| side | s (range) | img/s | page faults / call | vs reference |\n|---|---|---|---|---|")
    for side, rs in runs.items():
        times = [r["seconds"] for r in rs]
        faults = statistics.median(r["faults"] for r in rs)
        print(f"| {side} | {seconds[side]:.2f} ({min(times):.2f}-{max(times):.2f}) | {B / seconds[side]:.2f} "
              f"| {faults:,.0f} | {seconds['reference'] / seconds[side]:.2f}x |")
    for side in ("ours", "ours-compiled"):
        report_ratio(f"{kind} {PRESET}, each side at its defaults: {side} vs reference",
                     seconds["reference"] / seconds[side],
                     f"(reference {B / seconds['reference']:.2f} img/s, {side} {B / seconds[side]:.2f} img/s)")
    assert all(s > 0 for s in seconds.values())


if __name__ == "__main__":
    kind, side = sys.argv[1:3]
    print(json.dumps((_generation if kind == "generation" else _training)(side)))
