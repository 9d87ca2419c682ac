"""Gumbel top-k unmasking: compiled CPU kernel vs the reference, the sampler's semantics, statistics."""
import importlib.util

import pytest
import torch
from conftest import assert_same, needs_c
from conftest import make_unmask_inputs as make_inputs

from addp import ops
from addp.ops import gumbel_topk_unmask, gumbel_topk_unmask_reference, has_compiled_ops, lowest_k_mask_reference


def run(backend, logits, ids, mask, mask_len, tau, seed=1, top_p=1.0):
    return gumbel_topk_unmask(logits, ids, mask, mask_len, tau, torch.Generator().manual_seed(seed), top_p,
                              backend=backend)


# (B, L, K): K < 16 / not a power of two / up to 16384, L up to 1024, B up to 64
SHAPES = [(1, 1, 16), (2, 7, 3), (64, 64, 512), (3, 1024, 100), (1, 9, 16384), (5, 33, 1000),
          (64, 5, 17), (2, 256, 1024), (4, 100, 4097), (16, 31, 63)]


@needs_c
@pytest.mark.parametrize("i", range(len(SHAPES)), ids=[str(s) for s in SHAPES])
def test_parity_cpu(i):
    B, L, K = SHAPES[i]
    dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
    layout = ("contig", "sliced", "transposed")[i % 3 - 1 if i % 2 else i % 3]
    logits, ids, mask = make_inputs(B, L, K, dtype, layout, seed=i)
    mask_len = (1, L, L // 2, 0)[i % 4]
    if i % 2:
        mask_len = torch.tensor(mask_len)
    tau = (0.0, 4.5)[i % 2]
    assert_same(run("cpu", logits, ids, mask, mask_len, tau), run("reference", logits, ids, mask, mask_len, tau))


@needs_c
@pytest.mark.parametrize("top_p", [0.3, 0.9])
def test_parity_top_p(top_p):
    logits, ids, mask = make_inputs(4, 50, 200, seed=3)
    assert_same(run("cpu", logits, ids, mask, 20, 2.0, top_p=top_p),
                run("reference", logits, ids, mask, 20, 2.0, top_p=top_p))


@needs_c
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_isa(isa, monkeypatch):
    monkeypatch.setenv("ADDP_CPU_ISA", isa)
    logits, ids, mask = make_inputs(3, 40, 77, layout="sliced")
    assert_same(run("cpu", logits, ids, mask, 11, 1.0), run("reference", logits, ids, mask, 11, 1.0))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_c)])
def test_matches_sampler_step(backend):
    """Same generator state -> the selection addp.sampling documents (noise order; no ties here)."""
    logits, ids, mask = make_inputs(3, 64, 128, seed=5)
    g = torch.Generator().manual_seed(7)
    sampled = torch.argmax(logits + ops.gumbel(torch.rand(logits.shape, generator=g)), -1)
    exp_ids = torch.where(mask, sampled, ids)
    prob = torch.softmax(logits, -1).gather(-1, exp_ids[..., None])[..., 0]
    noise = ops.gumbel(torch.rand(mask.shape, generator=g, dtype=torch.float64))
    conf = (torch.log(prob) + (2.5 * noise).float()).masked_fill(~mask, float("inf"))
    exp_mask = torch.zeros_like(mask).scatter(-1, torch.topk(conf, 9, largest=False).indices, True)
    assert_same(run(backend, logits, ids, mask, 9, 2.5, seed=7), (exp_ids, exp_mask))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_c)])
def test_edge_cases(backend):
    logits, ids, mask = make_inputs(2, 10, 12, seed=2)
    none = torch.zeros_like(mask)
    # all reliable: ids unchanged; +inf confidences tie -> the lowest indices are chosen
    new_ids, new_mask = run(backend, logits, ids, none, 3, 1.0)
    assert torch.equal(new_ids, ids) and torch.equal(new_mask, torch.arange(10).expand(2, 10) < 3)
    for n, expected in [(0, 0), (-2, 0), (1, 1), (10, 10), (15, 10)]:  # mask_len clamped to [0, L]
        assert run(backend, logits, ids, mask, n, 1.0)[1].sum(-1).tolist() == [expected] * 2
    # ties: identical rows and tau = 0 -> equal confidences, the lower index wins
    flat = torch.zeros(1, 6, 4)
    _, m = run(backend, flat, torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.bool), 2, 0.0)
    assert m.tolist() == [[True, True, False, False, False, False]]
    # -inf logits are never sampled; K = 1
    lg = logits.clone()
    lg[..., 3:] = float("-inf")
    assert (run(backend, lg, ids, torch.ones_like(mask), 4, 1.0)[0] < 3).all()
    one = run(backend, logits[..., :1], ids * 0, mask, 4, 1.0)
    assert (one[0] == 0).all() and (one[1].sum(-1) == 4).all()


def test_lowest_k_mask_tensor_length():
    conf = torch.tensor([[3.0, 1.0, 2.0, 1.0, float("inf")]])
    assert lowest_k_mask_reference(conf, torch.tensor(2)).tolist() == [[False, True, False, True, False]]
    assert lowest_k_mask_reference(conf, 3).tolist() == [[False, True, True, True, False]]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_c)])
def test_chi_square(backend):
    """Sampled ids follow softmax(logits) (and the nucleus renormalised when top_p < 1)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    K, n = 37, 20000
    row = torch.randn(K, generator=torch.Generator().manual_seed(0)) * 1.5
    logits = row.expand(1, n, K)
    for top_p in (1.0, 0.8):
        ids, _ = run(backend, logits, torch.zeros(1, n, dtype=torch.long), torch.ones(1, n, dtype=torch.bool),
                     0, 1.0, seed=11, top_p=top_p)
        p = torch.softmax(row.double(), -1)
        if top_p < 1:
            p = p * ops.nucleus_keep(row, top_p)
            p = p / p.sum()
        counts = torch.bincount(ids.flatten(), minlength=K).double()
        support = p > 0
        assert counts[~support].sum() == 0
        expected = n * p[support]
        stat = float(((counts[support] - expected) ** 2 / expected).sum())
        dof = int(support.sum()) - 1
        assert stat < scipy_stats.chi2.ppf(1 - 1e-4, dof), f"chi2 = {stat:.1f} with {dof} dof (top_p={top_p})"


@needs_c
def test_opcheck():
    logits, ids, mask = make_inputs(2, 6, 20, layout="sliced")
    g = torch.Generator().manual_seed(0)
    u1, u2 = torch.rand(2, 6, 20, generator=g), torch.rand(2, 6, generator=g, dtype=torch.float64)
    keep = ops.nucleus_keep(logits, 0.7)
    for k in (None, keep):
        torch.library.opcheck(torch.ops.addp.gumbel_topk_unmask.default,
                              (logits, u1, u2, ids, mask, torch.tensor(3), 2.0, k))


@needs_c
def test_bad_inputs():
    logits, ids, mask = make_inputs(2, 6, 20)
    with pytest.raises(ValueError, match="must be \\(B, L\\)"):
        gumbel_topk_unmask(logits, ids[:, :3], mask, 1, 1.0, backend="cpu")
    with pytest.raises(RuntimeError, match="u2 must be float64"):
        torch.ops.addp.gumbel_topk_unmask(logits, torch.rand(2, 6, 20), torch.rand(2, 6), ids, mask,
                                          torch.tensor(1), 1.0, None)
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        gumbel_topk_unmask(logits, ids, mask, 1, 1.0, backend="cuda")


def test_reference_agrees_with_noise_given():
    logits, ids, mask = make_inputs(2, 8, 10)
    g = torch.Generator().manual_seed(3)
    u1 = torch.rand(2, 8, 10, generator=g)
    u2 = torch.rand(2, 8, generator=g, dtype=torch.float64)
    expected = gumbel_topk_unmask_reference(logits, u1, u2, ids, mask, 3, 1.0)
    assert_same(run("reference", logits, ids, mask, 3, 1.0, seed=3), expected)


# --------------------------------------------------------------------------- CUDA C++ kernel
def _cuda_kernel_built() -> bool:
    return (torch.cuda.is_available() and has_compiled_ops()
            and torch._C._dispatch_has_kernel_for_dispatch_key("addp::gumbel_topk_unmask_cuda", "CUDA"))


needs_cuda_kernel = pytest.mark.skipif(not _cuda_kernel_built(), reason="no CUDA device, or addp._C was built "
                                       "without its CUDA kernels (ADDP_BUILD_CUDA=1)")


@pytest.mark.cuda
@needs_cuda_kernel
@pytest.mark.parametrize("i", range(len(SHAPES)), ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_parity_cuda(i, dtype):
    B, L, K = SHAPES[i]
    logits, ids, mask = (t.cuda() for t in make_inputs(B, L, K, dtype, layout=("contig", "sliced", "transposed")[i % 3]))
    for mask_len in (1, L, torch.tensor(L // 2, device="cuda"), 0):
        for top_p in (1.0, 0.8):
            a, b = (gumbel_topk_unmask(logits, ids, mask, mask_len, 2.0, torch.Generator("cuda").manual_seed(1),
                                       top_p, backend=backend) for backend in ("cuda", "reference"))
            assert_same(a, b)


@pytest.mark.cuda
@needs_cuda_kernel
def test_cuda_ties_all_reliable_and_infinite_logits():
    flat = torch.zeros(2, 6, 4, device="cuda")
    ids = torch.arange(6, device="cuda").expand(2, 6).contiguous()
    for mask in (torch.ones(2, 6, dtype=torch.bool, device="cuda"), torch.zeros(2, 6, dtype=torch.bool, device="cuda")):
        new_ids, new_mask = gumbel_topk_unmask(flat, ids, mask, 2, 0.0, backend="cuda")
        assert new_mask.tolist() == [[True, True, False, False, False, False]] * 2  # ties: lower index first
        if not mask.any():
            assert torch.equal(new_ids, ids)
    logits = torch.full((1, 3, 5), float("-inf"), device="cuda")
    logits[0, :, 3] = 0.0  # one finite logit per row: always sampled
    new_ids, _ = gumbel_topk_unmask(logits, ids[:1, :3], torch.ones(1, 3, dtype=torch.bool, device="cuda"), 1, 1.0,
                                    backend="cuda")
    assert new_ids.tolist() == [[3, 3, 3]]


@pytest.mark.cuda
@needs_cuda_kernel
def test_cuda_kernel_opcheck():
    logits, ids, mask = (t.cuda() for t in make_inputs(2, 6, 20))
    u1 = torch.rand(2, 6, 20, device="cuda")
    u2 = torch.rand(2, 6, device="cuda", dtype=torch.float64)
    torch.library.opcheck(torch.ops.addp.gumbel_topk_unmask_cuda.default,
                          (logits, u1, u2, ids, mask, torch.tensor(3, device="cuda"), 2.0, None))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_auto_prefers_triton_on_cuda(monkeypatch):
    """The CUDA C++ kernel runs only when asked for: auto takes the Triton kernel on CUDA tensors
    (the dispatcher's CUDA kernel; asking which runs needs no GPU)."""
    monkeypatch.delenv("ADDP_OPS_BACKEND", raising=False)
    assert ops.backends("cuda") == {"codebook_weighted_sum": "triton", "gumbel_topk_unmask": "triton",
                                    "soft_target_cross_entropy": "triton", "dropout": "reference",
                                    "group_norm_silu": "reference", "conv3x3_winograd": "reference"}
