"""Triton kernels vs the references: on CUDA when present, else on the CPU under TRITON_INTERPRET=1.

The interpreter flag must be set before addp.ops and the triton-decorated kernels are imported
(under it the ops' CPU kernels are the Triton kernels), and setting it in this process would
change other test modules. So without a GPU, `test_in_interpreter_subprocess` reruns this module in a
subprocess with TRITON_INTERPRET=1 (tiny shapes: the interpreter is slow), and the kernel
tests here are skipped in the parent process.
"""
import os
import subprocess
import sys

import pytest
import torch

from addp import ops

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
RUNS_HERE = HAS_TRITON and (torch.cuda.is_available() or INTERPRET)
pytestmark = pytest.mark.cuda  # the GPU check runs this module
runs_here = pytest.mark.skipif(not RUNS_HERE, reason="no CUDA and not under TRITON_INTERPRET=1 (see the subprocess test)")


@pytest.mark.skipif(RUNS_HERE or not HAS_TRITON, reason="kernels run directly in this process" if HAS_TRITON
                    else "triton is not installed")
def test_in_interpreter_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, timeout=300, cwd=os.path.dirname(__file__))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def rand(*shape, seed=0, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


# tiny under the interpreter; GPU runs add the larger shapes
SMALL = [(2, 5, 16, 8), (1, 3, 40, 24), (3, 17, 100, 33)]
LARGE = [(64, 256, 1024, 256), (4, 1024, 16384, 64), (7, 13, 1000, 48)] if DEVICE == "cuda" else []


@runs_here
@pytest.mark.parametrize("shape", SMALL + LARGE, ids=str)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_weighted_sum(shape, dtype, tol):
    B, L, K, D = shape
    logits = rand(B, L, K + 3, dtype=dtype)[..., 1:K + 1]  # sliced, non-contiguous
    codebook = rand(K, D, seed=1, dtype=dtype, scale=1.0)
    ids = torch.randint(0, K, (B, L), device=DEVICE)
    mask = torch.rand(B, L, device=DEVICE) < 0.5
    for args in [(None, None), (ids, mask)]:
        out = ops.codebook_weighted_sum(logits, codebook, *args, 0.7, backend="triton")
        ref = ops.codebook_weighted_sum_reference(logits, codebook, *args, 0.7)
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@runs_here
@pytest.mark.parametrize("shape", [(2, 5, 16), (3, 9, 70), (1, 4, 3)] + [(s[0], s[1], s[2]) for s in LARGE], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gumbel_topk_unmask(shape, dtype):
    B, L, K = shape
    logits = rand(L, B, K, dtype=dtype).transpose(0, 1)
    ids = torch.randint(0, K, (B, L), device=DEVICE)
    mask = torch.rand(B, L, device=DEVICE) < 0.6
    for mask_len, top_p in [(1, 1.0), (L, 1.0), (torch.tensor(L // 2), 0.8), (0, 1.0)]:
        res = [ops.gumbel_topk_unmask(logits, ids, mask, mask_len, 2.0, torch.Generator(DEVICE).manual_seed(3),
                                      top_p, backend=b) for b in ("triton", "reference")]
        # same noise and tau in float64 as the reference; log p is float32 on both sides but rounded
        # by different code, so exact near-ties could differ (none at these seeds)
        assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


@runs_here
def test_gumbel_topk_unmask_ties_and_all_reliable():
    flat = torch.zeros(2, 6, 4, device=DEVICE)
    ids = torch.arange(6, device=DEVICE).expand(2, 6).contiguous()
    for mask in (torch.ones(2, 6, dtype=torch.bool, device=DEVICE), torch.zeros(2, 6, dtype=torch.bool, device=DEVICE)):
        new_ids, new_mask = ops.gumbel_topk_unmask(flat, ids, mask, 2, 0.0, backend="triton")
        assert new_mask.tolist() == [[True, True, False, False, False, False]] * 2
        if not mask.any():
            assert torch.equal(new_ids, ids)


@runs_here
@pytest.mark.parametrize("shape", [(2, 5, 18, 16), (3, 7, 70, 64), (1, 2, 5, 1)] + [(64, 256, 1026, 1024)] * bool(LARGE),
                         ids=str)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-3), (torch.float16, 2e-3)])
def test_soft_target_cross_entropy(shape, dtype, tol):
    B, L, V, K = shape
    logits = rand(B, L, 2 * V, dtype=dtype)[..., ::2]
    target = torch.softmax(rand(B, L, K, seed=2), -1)
    mask = torch.rand(B, L, device=DEVICE) < 0.5
    results = []
    for backend in ("triton", "reference"):
        x = logits.detach().clone().requires_grad_(True)
        loss = ops.soft_target_cross_entropy(x, target, mask, 0.1, backend=backend)
        results.append((loss, torch.autograd.grad(loss * 1.3, x)[0]))
    (loss, grad), (ref_loss, ref_grad) = results
    torch.testing.assert_close(loss, ref_loss, atol=tol, rtol=tol)
    scale = ref_grad.float().abs().max().clamp_min(1e-30)
    torch.testing.assert_close(grad.float() / scale, ref_grad.float() / scale, atol=4 * tol, rtol=0)


@runs_here
def test_opcheck_triton_ops():
    """opcheck of the public ops where the dispatcher runs their Triton kernels (CUDA tensors, or
    CPU tensors under TRITON_INTERPRET=1)."""
    routes = ops.backends(DEVICE)
    assert routes.pop("dropout") == "reference"  # a CPU kernel only: GPUs run torch's dropout
    assert routes.pop("group_norm_silu") == "reference"  # a CPU kernel only: GPUs run torch's ops
    assert routes.pop("conv3x3_winograd") == "reference"  # a CPU kernel only: GPUs run cuDNN's convolution
    assert set(routes.values()) == {"triton"}
    lg, cb = rand(2, 3, 16), rand(16, 8, seed=1)
    ids = torch.randint(0, 16, (2, 3), device=DEVICE)
    mask = torch.tensor([[True, False, True], [True, True, False]], device=DEVICE)
    torch.library.opcheck(torch.ops.addp.codebook_weighted_sum.default, (lg, cb, ids, mask, 0.7))
    u1 = torch.rand(2, 3, 16, device=DEVICE)
    u2 = torch.rand(2, 3, device=DEVICE, dtype=torch.float64)
    torch.library.opcheck(torch.ops.addp.gumbel_topk_unmask.default,
                          (lg, u1, u2, ids, mask, torch.tensor(2, device=DEVICE), 1.0, None))
    target = torch.softmax(rand(2, 3, 14), -1)
    loss, lse, qsum = torch.ops.addp.soft_target_cross_entropy(lg, target, mask, 0.1)
    torch.library.opcheck(torch.ops.addp.soft_target_cross_entropy.default, (lg, target, mask, 0.1))
    torch.library.opcheck(torch.ops.addp.soft_target_cross_entropy.default,
                          (lg.clone().requires_grad_(True), target, mask, 0.1))
    torch.library.opcheck(torch.ops.addp.soft_target_cross_entropy_backward.default,
                          (torch.tensor(1.0, device=DEVICE), lg, target, mask, lse, qsum, 0.1))
