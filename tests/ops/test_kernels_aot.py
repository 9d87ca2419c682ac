"""Every Triton kernel compiles for sm_90 (H100/H200) and sm_80 (A100), without a GPU.

The interpreter tests (tests/ops/test_kernels_triton.py) check the kernels' arithmetic; this
module runs the real compiler on every launch the launchers make at the ViT-B/L 256 px
shapes, the CPU presets and a tiny shape, and checks the compiled kernels against the
targets' limits (tools/triton_aot.py does the work).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.append(str(Path(__file__).parents[2] / "tools"))
import triton_aot  # noqa: E402

RESULTS = Path(__file__).parents[2] / "benchmarks" / "results" / "triton_aot_resources.md"


@pytest.fixture(scope="module")
def compiled():
    return triton_aot.compile_all()


def _kernel_names() -> set[str]:
    return {k.__name__ for k in triton_aot._jit_functions()}


def test_every_kernel_compiles_for_every_target(compiled):
    got = {(r.kernel, r.target) for r in compiled}
    want = {(k, t) for k in _kernel_names() for t in triton_aot.TARGETS}
    assert want <= got, f"never compiled: {sorted(want - got)}"


def test_compiled_kernels_fit_the_targets(compiled):
    bad = [f"{r.kernel} {r.target} [{r.case}; {r.constexprs}]: {'; '.join(r.problems)}"
           for r in compiled if r.problems]
    assert not bad, "\n".join(bad)
    assert all(r.registers > 0 for r in compiled)  # ptxas was read


def test_no_register_spills_at_the_users_layout(compiled):
    """ViT-B/L at 256 px is what runs on GPUs (the CPU presets run on CPUs)."""
    spilling = [f"{r.kernel} {r.target} [{r.case}; {r.constexprs}]: {r.spill_bytes} B"
                for r in compiled if r.case.startswith("vit-256") and r.spill_bytes]
    assert not spilling, "\n".join(spilling)


def test_committed_resource_table_covers_every_kernel():
    text = RESULTS.read_text()
    for kernel in _kernel_names():
        for target in triton_aot.TARGETS:
            assert f"| {kernel} | {target} |" in text, (
                f"{RESULTS.name} lacks {kernel} on {target}: rerun `python tools/triton_aot.py --out {RESULTS}`")


def _weighted_sum_launch():
    import torch
    import addp.kernels.weighted_sum as ws
    s = triton_aot.SHAPES["cpu-small"]
    (launch,) = triton_aot.capture_launches(lambda: ws.codebook_weighted_sum(
        torch.randn(s.B, s.L, s.K), torch.randn(s.K, s.D), None, None, 1.0))
    return launch


def _with(launch, **meta):
    return triton_aot.Launch(launch.kernel, launch.args, {**launch.kwargs, **meta})


# A kernel that reads a plain Python global: the interpreter accepts it, the GPU compiler
# refuses it (only `tl.constexpr` globals may be read; kernels/gumbel_topk.py declares its
# constants so).
GLOBAL_READING_KERNEL = """
import triton
import triton.language as tl

SCALE = 2.0


@triton.jit
def scale_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(out_ptr + i, tl.load(x_ptr + i, mask=i < n) * SCALE, mask=i < n)
"""


def test_compiler_rejects_a_global_the_interpreter_accepts(tmp_path):
    import importlib.util

    import torch
    (tmp_path / "global_kernel.py").write_text(GLOBAL_READING_KERNEL)
    spec = importlib.util.spec_from_file_location("global_kernel", tmp_path / "global_kernel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x = torch.arange(16, dtype=torch.float32)
    launch = triton_aot.Launch(module.scale_kernel, (x, torch.empty_like(x), 16), {"BLOCK": 16})
    with pytest.raises(Exception, match="global"):
        triton_aot.compile_launch(launch, "sm_90")
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, sys.argv[1])
        import global_kernel
        x = torch.arange(16, dtype=torch.float32)
        out = torch.empty_like(x)
        global_kernel.scale_kernel[(1,)](x, out, 16, BLOCK=16)
        assert torch.equal(out, 2 * x), out
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_shared_memory_overrun_is_reported():
    """Blocks too large for the shared memory of an A100 compile but could never launch."""
    launch = _with(_weighted_sum_launch(), BLOCK_R=64, BLOCK_K=128, BLOCK_D=128, num_warps=8)
    kernel, _ = triton_aot.compile_launch(launch, "sm_80")
    problems = triton_aot.limit_problems("sm_80", 1, kernel.metadata.shared, kernel.metadata.num_warps)
    assert kernel.metadata.shared > triton_aot.TARGETS["sm_80"][1]
    assert any("shared memory" in p for p in problems)
