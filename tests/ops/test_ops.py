"""Parity and error tests of codebook_weighted_sum (compiled CPU kernel vs the reference), and of the
backend choice shared by the fused ops."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LAYOUTS, assert_close, make_inputs, needs_c

import addp.ops as ops
from addp.ops import codebook_weighted_sum, codebook_weighted_sum_reference, has_compiled_ops

# (B, L, K, D, V): K < 8, K and D not multiples of 8/16/32/64, V > K, up to B=64, L=300, K=2000, D=300
SHAPES = [
    (1, 1, 1, 1, 1), (1, 1, 5, 3, 7), (2, 3, 7, 9, 7), (64, 64, 512, 64, 1536),
    (4, 300, 2000, 300, 2000), (3, 17, 100, 33, 1124), (8, 256, 1024, 256, 2025), (5, 31, 63, 17, 64),
    (2, 255, 129, 65, 130), (16, 16, 33, 1, 40), (7, 13, 1000, 48, 1000), (1, 300, 257, 100, 300),
    (64, 2, 17, 300, 17), (3, 50, 8, 16, 9), (9, 9, 31, 31, 31), (2, 64, 512, 64, 512),
    (12, 40, 2000, 7, 2048), (1, 5, 2, 2, 3), (33, 3, 127, 129, 200), (64, 1, 64, 32, 100),
]


@needs_c
@pytest.mark.parametrize("i", range(len(SHAPES)), ids=[str(s) for s in SHAPES])
def test_weighted_sum_fp32_parity(i):
    B, L, K, D, V = SHAPES[i]
    layout, masked, temperature = LAYOUTS[i % 4], i % 3 != 0, (1.0, 0.7)[i % 2]
    logits, codebook, ids, mask = make_inputs(B, L, K, D, V, layout, masked, seed=i)
    out = codebook_weighted_sum(logits, codebook, ids, mask, temperature, backend="cpu")
    ref = codebook_weighted_sum_reference(logits, codebook, ids, mask, temperature)
    assert out.shape == (B, L, D) and out.is_contiguous()
    assert_close(out, ref, atol=1e-5, rtol=1e-5)


@needs_c
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("shape", [(3, 70, 300, 80, 333), (2, 13, 9, 16, 9), (4, 20, 64, 64, 64)])
def test_weighted_sum_every_isa(isa, shape, monkeypatch):
    monkeypatch.setenv("ADDP_CPU_ISA", isa)  # caps the kernel variant (falls back if unsupported)
    logits, codebook, ids, mask = make_inputs(*shape, layout="sliced")
    out = codebook_weighted_sum(logits, codebook, ids, mask, 0.7, backend="cpu")
    assert_close(out, codebook_weighted_sum_reference(logits, codebook, ids, mask, 0.7), 1e-5, 1e-5)


@needs_c
@pytest.mark.parametrize("dtype,cb_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.bfloat16),
])
@pytest.mark.parametrize("shape", [(4, 37, 1024, 256, 2025), (2, 5, 7, 3, 9)])
def test_weighted_sum_low_precision(dtype, cb_dtype, shape):
    logits, codebook, ids, mask = make_inputs(*shape, layout="transposed", dtype=dtype, cb_dtype=cb_dtype)
    for args in [(None, None), (ids, mask)]:
        out = codebook_weighted_sum(logits, codebook, *args, 0.7, backend="cpu")
        assert out.dtype == cb_dtype
        assert_close(out, codebook_weighted_sum_reference(logits, codebook, *args, 0.7), 1e-2, 1e-2)


@needs_c
def test_weighted_sum_edge_values():
    logits, codebook, ids, mask = make_inputs(2, 6, 40, 24, 50, masked=False)
    logits[0, 0, 5:] = float("-inf")    # partly -inf row (e.g. after top-p filtering)
    logits[0, 1, :40] = float("-inf")   # all K logits -inf: undefined (NaN) in the reference too
    logits[1, 2, 10] = 1e4              # one dominant logit
    out = codebook_weighted_sum(logits, codebook, backend="cpu")
    ref = codebook_weighted_sum_reference(logits, codebook)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, 1] = False
    assert_close(out[keep], ref[keep], 1e-5, 1e-5)
    assert torch.equal(out[1, 2], codebook[10])


@needs_c
def test_weighted_sum_reliable_rows_are_exact_and_empty_inputs():
    logits, codebook, ids, mask = make_inputs(3, 8, 30, 20, 30, dtype=torch.bfloat16)
    out = codebook_weighted_sum(logits, codebook, ids, torch.zeros_like(mask), backend="cpu")
    assert torch.equal(out, codebook[ids])
    empty = codebook_weighted_sum(logits[:0], codebook, backend="cpu")
    assert empty.shape == (0, 8, 20)
    one_row = codebook_weighted_sum(logits[0, 0], codebook, backend="cpu")  # 1-D logits
    assert_close(one_row, codebook_weighted_sum_reference(logits[0, 0], codebook), 1e-2, 1e-2)


@needs_c
@pytest.mark.parametrize("masked", [False, True])
def test_weighted_sum_opcheck(masked):
    for dtype in (torch.float32, torch.bfloat16):
        logits, codebook, ids, mask = make_inputs(2, 5, 12, 8, 15, layout="sliced", masked=masked, dtype=dtype)
        torch.library.opcheck(torch.ops.addp.codebook_weighted_sum.default, (logits, codebook, ids, mask, 0.7))


@needs_c
def test_weighted_sum_torch_compile():
    logits, codebook, ids, mask = make_inputs(2, 9, 20, 16, 24)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(lg, cb, ids, mask):
        return codebook_weighted_sum(lg * 1.5, cb, ids, mask, temperature=0.7, backend="cpu") + 1

    expected = codebook_weighted_sum_reference(logits * 1.5, codebook, ids, mask, 0.7) + 1
    assert_close(f(logits, codebook, ids, mask), expected, 1e-5, 1e-5)


def test_auto_backend_and_gradients():
    logits, codebook, ids, mask = make_inputs(2, 4, 10, 6, 12)
    out = codebook_weighted_sum(logits, codebook, ids, mask)  # auto: compiled when available
    assert_close(out, codebook_weighted_sum_reference(logits, codebook, ids, mask), 1e-5, 1e-5)
    logits.requires_grad_(True)
    out = codebook_weighted_sum(logits, codebook, ids, mask)  # auto picks the differentiable reference
    out.sum().backward()
    assert logits.grad is not None and logits.grad.shape == logits.shape


_WITHOUT_C = """
import sys
# an editable install of addp elsewhere would supply its own addp._C: keep to this copy
sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
import torch
import addp.ops as ops
from conftest import make_inputs
logits, codebook, _, _ = make_inputs(2, 4, 10, 6, 12, masked=False)
assert not ops.has_compiled_ops()
assert torch.equal(ops.codebook_weighted_sum(logits, codebook), ops.codebook_weighted_sum_reference(logits, codebook))
assert set(ops.backends("cpu").values()) == {"reference"}, ops.backends("cpu")
try:
    ops.codebook_weighted_sum(logits, codebook, backend="cpu")
except RuntimeError as exc:
    print("error:", exc)
import addp, addp.ops  # imported again: no second warning
"""


def test_import_without_extension_warns_once_and_falls_back(tmp_path):
    """A copy of the package without addp/_C*.so: one WARNING naming the reason and the fix,
    the reference runs under auto, and an explicit backend="cpu" fails in one line."""
    src = Path(ops.__file__).parents[1]
    shutil.copytree(src, tmp_path / "addp", symlinks=True,
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "kernels", "__pycache__"))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{Path(__file__).parents[1]}")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_C], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "addp._C" in line]
    assert len(warnings) == 1, proc.stderr
    assert "did not load" in warnings[0] and "pip install --no-build-isolation -e ." in warnings[0]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "backend 'cpu' is unavailable" in errors[0] and "addp._C did not load" in errors[0]


def test_backends_follow_the_override(monkeypatch):
    monkeypatch.delenv("ADDP_OPS_BACKEND", raising=False)
    expected = "cpu" if has_compiled_ops() else "reference"
    expected_names = ["codebook_weighted_sum", "gumbel_topk_unmask", "soft_target_cross_entropy", "dropout",
                      "group_norm_silu", "conv3x3_winograd"]
    assert ops.backends("cpu") == {name: expected for name in expected_names}
    monkeypatch.setenv("ADDP_OPS_BACKEND", "reference")
    assert set(ops.backends("cpu").values()) == {"reference"}
    monkeypatch.setenv("ADDP_OPS_BACKEND", "triton")
    assert all("backend 'triton' is unavailable" in v for v in ops.backends("cpu").values())
    assert ops.backends("cpu", "reference") == {name: "reference" for name in expected_names}


@pytest.mark.parametrize("backend", ["triton", "nonsense"])
def test_unavailable_backend_raises(backend, monkeypatch):
    logits, codebook, _, _ = make_inputs(1, 2, 4, 3, 4, masked=False)
    with pytest.raises(RuntimeError, match=backend) as err:
        codebook_weighted_sum(logits, codebook, backend=backend)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("ADDP_OPS_BACKEND", backend)
    with pytest.raises(RuntimeError, match=backend):
        codebook_weighted_sum(logits, codebook)


def test_cuda_backend_applies_to_unmasking_only(monkeypatch):
    """The CUDA C++ kernels exist for unmasking only: the other ops run what auto picks."""
    logits, codebook, _, _ = make_inputs(1, 2, 4, 3, 4, masked=False)
    monkeypatch.setenv("ADDP_OPS_BACKEND", "cuda")
    auto = ops.backends("cpu", "auto")
    chosen = ops.backends("cpu")
    assert {k: v for k, v in chosen.items() if k != "gumbel_topk_unmask"} == \
        {k: v for k, v in auto.items() if k != "gumbel_topk_unmask"}
    assert "backend 'cuda' is unavailable" in chosen["gumbel_topk_unmask"]
    torch.testing.assert_close(codebook_weighted_sum(logits, codebook),
                               codebook_weighted_sum(logits, codebook, backend="auto"), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable for gumbel_topk_unmask") as err:
        ops.gumbel_topk_unmask(torch.randn(2, 6, 5), torch.zeros(2, 6, dtype=torch.long),
                               torch.ones(2, 6, dtype=torch.bool), 3, 1.0)
    assert "\n" not in str(err.value)


def _bad_inputs():
    lg, cb, ids, mask = make_inputs(2, 3, 8, 4, 10)
    bad_ids = ids.clone()
    bad_ids[1, 2] = 8
    return {
        "codebook not 2-D": ((lg, cb[None], None, None), "2-D"),
        "K > V": ((lg[..., :5], cb, None, None), "exceeds"),
        "ids out of range": ((lg, cb, bad_ids, mask), "out of range"),
        "mask without ids": ((lg, cb, None, mask), "together"),
        "int logits": ((lg.long(), cb, None, None), "float32"),
        "ids shape": ((lg, cb, ids[:, :2], mask[:, :2]), "shape"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_inputs_public_function(case):
    (lg, cb, ids, mask), pattern = _bad_inputs()[case]
    with pytest.raises((ValueError, RuntimeError), match=pattern) as err:
        codebook_weighted_sum(lg, cb, ids, mask, backend="cpu" if has_compiled_ops() else None)
    assert "\n" not in str(err.value).strip()


@needs_c
@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_inputs_compiled_op(case):
    (lg, cb, ids, mask), pattern = _bad_inputs()[case]
    with pytest.raises(RuntimeError, match=pattern) as err:
        torch.ops.addp.codebook_weighted_sum(lg, cb, ids, mask, 1.0)
    assert "\n" not in str(err.value).strip()


def test_bad_temperature():
    lg, cb, _, _ = make_inputs(1, 2, 4, 3, 4, masked=False)
    with pytest.raises(ValueError, match="temperature"):
        codebook_weighted_sum(lg, cb, temperature=0.0)


@needs_c
def test_simd_code_is_inlined_into_its_isa_entry_points():
    """The vector templates of csrc/ run at the ISA of the function that calls them only when
    inlined into it (target attributes do not reach out-of-line functions or lambdas). An
    out-of-line function over vector types is compiled for the baseline ISA and emulates
    512-bit vectors with SSE: it measured 5x slower (gumbel_topk_unmask, before the fix)."""
    import shutil
    import subprocess

    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    import addp._C
    symbols = subprocess.run([nm, "-C", addp._C.__file__], capture_output=True, text=True, check=True).stdout
    out_of_line = [line for line in symbols.splitlines() if "__vector" in line]
    assert not out_of_line, "vector code compiled out of line (baseline ISA):\n" + "\n".join(out_of_line[:5])
