"""Where the time of one generation step and of one training step goes, part by part, at the
official layout (benchmarks/presets.py: "official" on a CPU, "base" on a GPU; ADDP_BENCH_PRESET
overrides), in fp32 and at our device default precision. Print the tables with
``python -m pytest -s benchmarks/test_bench_breakdown.py``.

Generation step (mid-schedule: half the tokens reliable): VQ decode, ADDP encoder, ADDP
decoder (with its MLM head), unmasking (sampling, confidence, choice of positions), weighted
sum (softmax over the codebook times the codebook). Training step: VQ encode, token predictor
(both conditions in one batched pass), VQ decode, ADDP forward + backward, clipping +
optimizer. Each part is timed alone on the same inputs, the parts interleaved round by round.
"""
import os
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from addp import ops
from addp.training.stages import ADDPStage

sys.path.insert(0, str(Path(__file__).parent))
import presets as P  # noqa: E402

pytestmark = pytest.mark.study  # not in the default selection: --studies, -m study, or name this file

PRESET = os.environ.get("ADDP_BENCH_PRESET", "base" if P.DEVICE.type == "cuda" else "official").split(",")[-1]
ROUNDS = int(os.environ.get("ADDP_BENCH_ROUNDS", 5))


def _modes():
    """(label, autocast dtype): fp32 and our default (when that is not fp32)."""
    default = P.amp_dtypes("default")[1]
    return [("fp32", None)] + ([(P.our_precision("default"), default)] if default is not None else [])


def _table(title, parts, modes, times):
    """times[m][p]: list of seconds. Prints ms, share of the sum, and the speed-up of each mode."""
    med = [[statistics.median(t) * 1e3 for t in per_mode] for per_mode in times]
    spread = [[(max(t) - min(t)) * 1e3 for t in per_mode] for per_mode in times]
    totals = [sum(m) for m in med]
    print(f"\n{title}")
    head = f"| part | " + " | ".join(f"{label} ms (share)" for label, _ in modes)
    if len(modes) > 1:
        head += f" | {modes[0][0]} / {modes[1][0]}"
    print(head + " |")
    print("|" + "---|" * (len(modes) + 1 + (len(modes) > 1)))
    for i, part in enumerate(parts):
        row = f"| {part} | " + " | ".join(f"{med[m][i]:.1f} ±{spread[m][i] / 2:.1f} ({med[m][i] / totals[m]:.0%})"
                                          for m in range(len(modes)))
        if len(modes) > 1:
            row += f" | {med[0][i] / med[1][i]:.2f}x"
        print(row + " |")
    row = "| sum | " + " | ".join(f"{t:.1f}" for t in totals)
    if len(modes) > 1:
        row += f" | {totals[0] / totals[1]:.2f}x"
    print(row + " |")
    return totals


def _run(parts, modes):
    fns = [(lambda fn=fn, dtype=dtype: _under(dtype, fn)) for _, dtype in modes for fn in parts.values()]
    flat = P.interleaved_times(fns, ROUNDS)
    n = len(parts)
    return [flat[m * n:(m + 1) * n] for m in range(len(modes))]


def _under(dtype, fn):
    with P.autocast(dtype):
        fn()


def test_breakdown_generation_step():
    net, tok, _ = P.build(PRESET)
    B, L, K = P.batch_size(PRESET), net.config.num_patches, net.config.codebook_size
    g = torch.Generator(P.DEVICE).manual_seed(0)
    size = net.config.image_size
    x = torch.rand(B, 3, size, size, device=P.DEVICE)
    ids = torch.randint(0, K, (B, L), device=P.DEVICE, generator=g)
    mask = torch.rand(B, L, device=P.DEVICE, generator=g).argsort(1).argsort(1) < L // 2
    num_reliable = L - L // 2
    with torch.no_grad():
        features = net.forward_encoder(x)
        logits = net.forward_decoder(features, ids, mask, num_reliable)[..., :K].float()
        emb = ops.codebook_weighted_sum(logits, tok.codebook, ids, mask)
        parts = {
            "VQ decode": lambda: tok.decode_embeddings(emb),
            "ADDP encoder": lambda: net.forward_encoder(x),
            "ADDP decoder + head": lambda: net.forward_decoder(features, ids, mask, num_reliable),
            "unmasking": lambda: ops.gumbel_topk_unmask(logits, ids, mask, L // 4, 3.0, generator=g),
            "weighted sum": lambda: ops.codebook_weighted_sum(logits, tok.codebook, ids, mask),
        }
        modes = _modes()
        times = _run(parts, modes)
    totals = _table(f"generation step, {PRESET} layout, B={B}, L={L}, {num_reliable} reliable, "
                    f"{P.DEVICE.type}, {torch.get_num_threads()} threads (median of {ROUNDS} rounds, ms)",
                    list(parts), modes, times)
    assert all(t > 0 for t in totals)


def test_breakdown_training_step():
    net, tok, pred = P.build(PRESET)
    B = P.batch_size(PRESET)
    stage = ADDPStage(P.new_network(PRESET).train(), tok, pred)
    process = stage.process
    size = net.config.image_size
    images = torch.rand(B, 3, size, size, device=P.DEVICE)
    g = torch.Generator().manual_seed(0)
    inputs = stage.prepare(images, g)
    masks = process.schedule.draw(B, P.DEVICE, g)
    z0 = inputs["ids"]
    emb = tok.embed_ids(z0)
    model = stage.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=P.DEVICE.type in ("cuda", "cpu"))

    def forward_backward():
        stage.loss_module(**inputs).backward()

    def optimizer_step():
        nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()

    forward_backward()  # gradients exist for the optimizer part
    frozen = {
        "VQ encode": lambda: tok.encode(images),
        "token predictor (2 conditions)": lambda: process.predict(z0, masks),
        "VQ decode": lambda: tok.decode_embeddings(emb),
    }
    parts = {**{k: _no_grad(f) for k, f in frozen.items()},
             "ADDP forward + backward": forward_backward, "clip + AdamW": optimizer_step}
    modes = _modes()
    times = _run(parts, modes)
    totals = _table(f"training step, {PRESET} layout, B={B}, {P.DEVICE.type}, {torch.get_num_threads()} threads "
                    f"(median of {ROUNDS} rounds, ms)", list(parts), modes, times)
    assert all(t > 0 for t in totals)


def _no_grad(fn):
    def run():
        with torch.no_grad():
            fn()
    return run
