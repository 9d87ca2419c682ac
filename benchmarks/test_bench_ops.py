"""Compiled CPU ops vs their plain-PyTorch references (pytest benchmarks/): codebook weighted sum,
Gumbel top-k unmasking, soft-target cross entropy, dropout (vs torch's dropout), GroupNorm +
SiLU (vs torch's eager GroupNorm then SiLU, and vs the same two compiled by inductor), and the
Winograd 3x3 convolution (vs torch's channels-last convolution, oneDNN's direct algorithm).

The reference is timed in the same run, interleaved with the compiled op (one call each per
round), so that load from other processes on the machine hits both alike. Each test's ratio
(reference median / op median) is checked against its floor in benchmarks/floors.csv.
"""
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

from addp.ops import codebook_weighted_sum, codebook_weighted_sum_reference, has_compiled_ops

sys.path.insert(0, str(Path(__file__).parent))
import presets as P  # noqa: E402

B, L, K, D = 64, 64, 512, 64


def _interleaved_medians(fns, args, rounds=30, warmup=2):
    times = [[] for _ in fns]
    rounds, warmup = P.rounds(rounds), P.warmups(warmup)
    for i in range(warmup + rounds):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn(*args)
            if i >= warmup:
                ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


@pytest.mark.skipif(not has_compiled_ops(), reason="addp._C is not built")
@pytest.mark.parametrize("masked", [False, True], ids=["mask_none", "mask_50pct"])
def test_bench_codebook_weighted_sum_cpu(benchmark, report_ratio, slow_ours, masked):
    g = torch.Generator().manual_seed(0)
    logits, codebook = torch.randn(B, L, K, generator=g), torch.randn(K, D, generator=g)
    ids = torch.randint(0, K, (B, L), generator=g) if masked else None
    mask = torch.rand(B, L, generator=g) < 0.5 if masked else None
    args = (logits, codebook, ids, mask, 1.0)

    @slow_ours
    def compiled(*a):
        return codebook_weighted_sum(*a, backend="cpu")

    benchmark.group = f"codebook_weighted_sum B={B} L={L} K={K} D={D} fp32"
    benchmark.pedantic(compiled, args=args, rounds=10, iterations=3, warmup_rounds=1)
    ref_s, op_s = _interleaved_medians([codebook_weighted_sum_reference, compiled], args)
    _report(benchmark, report_ratio, f"codebook_weighted_sum cpu, {'50% mask' if masked else 'no mask'}", ref_s, op_s)


# --------------------------------------------------------------------------- Gumbel top-k unmasking
@pytest.mark.skipif(not has_compiled_ops(), reason="addp._C is not built")
def test_bench_gumbel_topk_unmask_cpu(benchmark, report_ratio, slow_ours):
    """Whole step incl. the noise draw (torch.rand, same in both), 60% positions unreliable."""
    from addp.ops import gumbel_topk_unmask
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, L, K, generator=g) * 3
    ids = torch.randint(0, K, (B, L), generator=g)
    mask = torch.rand(B, L, generator=g) < 0.6

    def run(backend):
        return lambda: gumbel_topk_unmask(logits, ids, mask, L // 3, 3.0, torch.Generator().manual_seed(1),
                                          backend=backend)

    benchmark.group = f"gumbel_topk_unmask B={B} L={L} K={K} fp32"
    ours = slow_ours(run("cpu"))
    benchmark.pedantic(ours, rounds=10, iterations=3, warmup_rounds=1)
    ref_s, op_s = _interleaved_medians([run("reference"), ours], (), rounds=20)
    _report(benchmark, report_ratio, "gumbel_topk_unmask cpu", ref_s, op_s)


@pytest.mark.skipif(not has_compiled_ops(), reason="addp._C is not built")
def test_bench_gumbel_topk_unmask_kernel_cpu(benchmark, report_ratio, slow_ours):
    """The step given its noise: the kernel vs the reference on the same uniforms (torch's CPU
    generator, one thread, takes most of the whole step above; both sides draw alike)."""
    from addp.ops import gumbel_topk_unmask_reference
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, L, K, generator=g) * 3
    ids = torch.randint(0, K, (B, L), generator=g)
    mask = torch.rand(B, L, generator=g) < 0.6
    u1, u2 = torch.rand(B, L, K, generator=g), torch.rand(B, L, generator=g, dtype=torch.float64)
    args = (logits, u1, u2, ids, mask, torch.tensor(L // 3), 3.0, None)

    benchmark.group = f"gumbel_topk_unmask kernel B={B} L={L} K={K} fp32"
    ours = slow_ours(torch.ops.addp.gumbel_topk_unmask)
    benchmark.pedantic(ours, args=args, rounds=10, iterations=3, warmup_rounds=1)
    ref_s, op_s = _interleaved_medians([gumbel_topk_unmask_reference, ours], args, rounds=20)
    _report(benchmark, report_ratio, "gumbel_topk_unmask cpu, noise given", ref_s, op_s)


# --------------------------------------------------------------------------- soft-target cross entropy
@pytest.mark.skipif(not has_compiled_ops(), reason="addp._C is not built")
def test_bench_soft_target_cross_entropy_cpu(benchmark, report_ratio, slow_ours):
    """Forward + backward, V = K + 2, 50% positions masked."""
    from addp.ops import soft_target_cross_entropy
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, L, K + 2, generator=g) * 3).requires_grad_(True)
    target = torch.softmax(torch.randn(B, L, K, generator=g), -1)
    mask = torch.rand(B, L, generator=g) < 0.5

    def run(backend):
        def step():
            loss = soft_target_cross_entropy(logits, target, mask, 0.1, backend=backend)
            return torch.autograd.grad(loss, logits)
        return step

    benchmark.group = f"soft_target_cross_entropy fwd+bwd B={B} L={L} V={K + 2} fp32"
    ours = slow_ours(run("cpu"))
    benchmark.pedantic(ours, rounds=10, iterations=3, warmup_rounds=1)
    ref_s, op_s = _interleaved_medians([run("reference"), ours], (), rounds=20)
    _report(benchmark, report_ratio, "soft_target_cross_entropy fwd+bwd cpu", ref_s, op_s)


# --------------------------------------------------------------------------- dropout
@pytest.mark.skipif(not has_compiled_ops(), reason="addp._C is not built")
@pytest.mark.parametrize("shape,dtype", [((2, 4, 385, 385), torch.float32), ((2, 257, 768), torch.bfloat16)],
                         ids=["attention_probs_fp32", "mlp_hidden_bf16"])
def test_bench_dropout_cpu(benchmark, report_ratio, slow_ours, shape, dtype):
    """Forward + backward, p = 0.1, vs torch's dropout (what runs without the kernel), on the
    official layout's shapes at CPU widths: the ADDP decoder's attention probabilities (batch 2,
    4 heads, 385 slots) and an MLP hidden layer under bf16."""
    from addp.ops import dropout
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_(True)
    grad = torch.ones_like(x)

    def run(fn):
        return lambda: torch.autograd.grad(fn(x), x, grad)

    theirs, ours = run(lambda t: torch.nn.functional.dropout(t, 0.1, True)), slow_ours(run(lambda t: dropout(t, 0.1)))
    benchmark.group = f"dropout fwd+bwd {tuple(shape)} {dtype}"
    benchmark.pedantic(ours, rounds=10, iterations=3, warmup_rounds=1)
    ref_s, op_s = _interleaved_medians([theirs, ours], (), rounds=20)
    _report(benchmark, report_ratio, f"dropout fwd+bwd cpu vs torch, {tuple(shape)} {dtype}", ref_s, op_s)


# --------------------------------------------------------------------------- GroupNorm + SiLU
@pytest.mark.skipif(not has_compiled_ops(), reason="addp._C is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("against", ["eager", "inductor"])
def test_bench_group_norm_silu_cpu(benchmark, report_ratio, slow_ours, dtype, against):
    """silu(group_norm(x)) at the full-resolution level of the MAGE VQGAN at CPU width
    (batch 2, 32 channels, 256 x 256, channels-last, 32 groups), vs torch's eager ops (their
    statistics in float32, as under autocast) or the two compiled by inductor."""
    from addp.ops import group_norm_silu
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 256, 256, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(32, generator=g), torch.randn(32, generator=g)

    def torch_ops(t):
        return torch.nn.functional.silu(torch.nn.functional.group_norm(t.float(), 32, w, b, 1e-6))

    theirs = torch.compile(torch_ops) if against == "inductor" else torch_ops
    ours = slow_ours(lambda t: group_norm_silu(t, w, b, 32, 1e-6))
    with torch.no_grad():
        theirs(x)
        benchmark.group = f"group_norm_silu {tuple(x.shape)} {dtype}"
        benchmark.pedantic(ours, args=(x,), rounds=10, iterations=3, warmup_rounds=1)
        ref_s, op_s = _interleaved_medians([theirs, ours], (x,), rounds=20)
    _report(benchmark, report_ratio, f"group_norm_silu cpu vs torch {against}, {tuple(x.shape)} {dtype}", ref_s, op_s)


@pytest.mark.skipif(not has_compiled_ops(), reason="addp._C is not built")
@pytest.mark.skipif(not torch.cpu.get_capabilities().get("avx512_bf16"), reason="the CPU has no AVX512-BF16")
def test_bench_group_norm_silu_bf16_rounding(benchmark, report_ratio, slow_ours, monkeypatch):
    """The bf16 kernel rounding its outputs with AVX512-BF16's conversion instruction vs the
    same AVX-512 kernel rounding with integer vector steps (ADDP_CPU_ISA=avx512, read per
    call); one thread, the size of the 128 px level (batch 2, 32 channels, channels-last)."""
    from addp.ops import group_norm_silu
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 128, 128, generator=g).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(32, generator=g), torch.randn(32, generator=g)

    def with_isa(cap):
        def run(t):
            if cap:
                monkeypatch.setenv("ADDP_CPU_ISA", cap)
            else:
                monkeypatch.delenv("ADDP_CPU_ISA", raising=False)
            return group_norm_silu(t, w, b, 32, 1e-6)
        return run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(with_isa("avx512")(x), with_isa(None)(x))
        benchmark.group = f"group_norm_silu bf16 rounding {tuple(x.shape)}"
        ours = slow_ours(with_isa(None))
        benchmark.pedantic(ours, args=(x,), rounds=10, iterations=3, warmup_rounds=1)
        ref_s, op_s = _interleaved_medians([with_isa("avx512"), ours], (x,), rounds=40)
        _report(benchmark, report_ratio, f"group_norm_silu bf16, AVX512-BF16 rounding vs integer rounding, "
                f"{tuple(x.shape)}", ref_s, op_s)
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- Winograd 3x3 convolution
@pytest.mark.skipif(not has_compiled_ops(), reason="addp._C is not built")
@pytest.mark.parametrize("C,K,H", [(32, 32, 256), (64, 64, 64), (128, 128, 16), (128, 128, 256)],
                         ids=["32ch_256px", "64ch_64px", "128ch_16px", "128ch_256px"])
def test_bench_conv3x3_winograd_cpu(benchmark, report_ratio, slow_ours, C, K, H):
    """The VQ decoder's convolutions, fp32, batch 2, channels-last: the levels of the MAGE
    VQGAN at CPU width (ch=32: 32 channels at 256 px, 64 at 64 px, 128 at 16 px) and its
    widest kernel-eligible level at full width (ch=128: 128 channels at 256 px). The transformed
    weight is computed once, as the VQ layers keep it."""
    from addp.ops import conv3x3, winograd_weight
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, C, H, H, generator=g).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(K, C, 3, 3, generator=g) / (3 * C ** 0.5)).contiguous(memory_format=torch.channels_last)
    b, u = torch.randn(K, generator=g), winograd_weight(w)

    def theirs(t):
        return torch.nn.functional.conv2d(t, w, b, padding=1)

    @slow_ours
    def ours(t):
        return conv3x3(t, w, b, u=u)

    rounds = 5 if H * H * C >= 128 * 256 * 256 else 20
    with torch.no_grad():
        benchmark.group = f"conv3x3 {tuple(x.shape)} -> {K} fp32"
        benchmark.pedantic(ours, args=(x,), rounds=rounds, iterations=1, warmup_rounds=1)
        ref_s, op_s = _interleaved_medians([theirs, ours], (x,), rounds=rounds)
    _report(benchmark, report_ratio, f"conv3x3 winograd cpu vs torch (oneDNN), {tuple(x.shape)} -> {K}", ref_s, op_s)


@pytest.mark.skipif(not has_compiled_ops(), reason="addp._C is not built")
@pytest.mark.parametrize("against", ["oneDNN", "winograd"])
def test_bench_upsample_conv3x3_cpu(benchmark, report_ratio, slow_ours, against):
    """The decoder's upsampling layer at the ch=32 layout's 256 px level (32 channels, 128 ->
    256 px, batch 2, fp32): the kernel reading the low-resolution input in place against the
    nearest-upsampled tensor built by F.interpolate, then convolved by oneDNN or by the
    kernel."""
    from addp.ops import conv3x3, winograd_weight
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 128, 128, generator=g).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(32, 32, 3, 3, generator=g) / 17).contiguous(memory_format=torch.channels_last)
    b, u = torch.randn(32, generator=g), winograd_weight(w)

    def theirs(t):
        up = torch.nn.functional.interpolate(t, scale_factor=2.0, mode="nearest")
        return torch.nn.functional.conv2d(up, w, b, padding=1) if against == "oneDNN" else conv3x3(up, w, b, u=u)

    @slow_ours
    def ours(t):
        return conv3x3(t, w, b, u=u, upsample=True)

    with torch.no_grad():
        benchmark.group = f"upsample + conv3x3 {tuple(x.shape)} fp32"
        benchmark.pedantic(ours, args=(x,), rounds=10, iterations=1, warmup_rounds=1)
        ref_s, op_s = _interleaved_medians([theirs, ours], (x,), rounds=20)
    _report(benchmark, report_ratio, f"upsample + conv3x3 in place vs interpolate + {against}, {tuple(x.shape)}",
            ref_s, op_s)


def _report(benchmark, report_ratio, name, ref_s, op_s):
    """Record the ratio (checked against its floor in benchmarks/floors.csv after the test)."""
    ratio = ref_s / op_s
    detail = f"(reference {ref_s * 1e3:.2f} ms, cpu {op_s * 1e3:.2f} ms, medians, {torch.get_num_threads()} threads)"
    benchmark.extra_info.update(reference_ms=ref_s * 1e3, cpu_ms=op_s * 1e3, speedup=ratio)
    report_ratio(name, ratio, detail)
    print(f"{name}: speedup {ratio:.2f}x {detail}")
