"""Philox dropout: the plain-PyTorch Philox against Random123's published answers, the compiled
CPU kernel against that reference (bit for bit, random shapes, dtypes, strides, ISAs), the
statistics of its masks, its backward, and the layers that use it."""
import hashlib
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_c

from addp import ops

from addp.models import layers
from addp.ops.philox_dropout import draw_seed, keep_mask_reference, philox4x32_10

# Random123's known-answer vectors for Philox4x32-10: (counter, key, output)
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_reference_philox_known_answers(counter, key, expected):
    assert tuple(int(w) for w in philox4x32_10(counter, key)) == expected


def _random_input(shape, dtype, layout, generator):
    x = torch.randn(shape, generator=generator).to(dtype)
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2)
    if layout == "sliced":
        return x[..., ::2]
    return x


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_kernel_equals_reference(dtype):
    g = torch.Generator().manual_seed(int(dtype.itemsize))
    for trial in range(12):
        shape = tuple(int(s) for s in torch.randint(1, 70, (int(torch.randint(1, 4, (), generator=g)),), generator=g))
        layout = ("contig", "transposed", "sliced")[trial % 3]
        x = _random_input(shape, dtype, layout, g)
        p = (0.1, 0.5, 0.9, float(torch.rand((), generator=g)))[trial % 4]
        seed = draw_seed(g)
        out, keep = torch.ops.addp.dropout(x, p, seed)
        assert out.dtype == dtype and keep.dtype == torch.bool and out.shape == x.shape
        assert torch.equal(keep, keep_mask_reference(x.shape, p, int(seed)))
        assert torch.equal(out, ops.dropout_reference(x, p, int(seed))), (shape, layout, p)


@needs_c
@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_kernel_same_on_every_isa_and_thread_count(isa):
    """The narrower ISAs and one thread give the widest ISA's result (another process: the ISA
    is read from ADDP_CPU_ISA per call, the thread count is set before any parallel work)."""
    code = ("import hashlib, torch, addp.ops\n"
            "torch.set_num_threads(1)\n"
            "x = torch.arange(100003, dtype=torch.float32)\n"
            "out, keep = torch.ops.addp.dropout(x, 0.3, torch.tensor(123456789012345))\n"
            "print(hashlib.sha256(out.numpy().tobytes() + keep.numpy().tobytes()).hexdigest())\n")
    env = {**os.environ, "ADDP_CPU_ISA": isa}
    narrow = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    x = torch.arange(100003, dtype=torch.float32)
    out, keep = torch.ops.addp.dropout(x, 0.3, torch.tensor(123456789012345))
    assert narrow.stdout.strip() == hashlib.sha256(out.numpy().tobytes() + keep.numpy().tobytes()).hexdigest()


@needs_c
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_independence(p):
    """Kept fraction within 5 standard deviations of 1 - p; neighbours (same Philox block,
    next block) and two calls uncorrelated."""
    n = 1 << 20
    x = torch.ones(n)
    _, keep = torch.ops.addp.dropout(x, p, draw_seed(torch.Generator().manual_seed(1)))
    _, other = torch.ops.addp.dropout(x, p, draw_seed(torch.Generator().manual_seed(2)))
    k, o = keep.double(), other.double()
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(k.mean().item() - (1 - p)) < 5 * sd
    for a, b in [(k[:-1], k[1:]), (k[:-4], k[4:]), (k, o)]:
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n), corr


@needs_c
def test_edge_probabilities():
    x = torch.randn(37)
    out, keep = torch.ops.addp.dropout(x, 1.0, torch.tensor(5))
    assert not keep.any() and torch.equal(out, torch.zeros_like(x))
    out, keep = torch.ops.addp.dropout(x, 0.0, torch.tensor(5))
    assert keep.all() and torch.equal(out, x)
    assert ops.dropout(x, 0.5, training=False) is x
    with pytest.raises(ValueError, match="p must be in"):
        ops.dropout(x, 1.5)
    with pytest.raises(ValueError, match="floating point"):
        ops.dropout(torch.arange(4), 0.5)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 7, generator=g).to(dtype).requires_grad_(True)
    grad = torch.randn(3, 50, 7, generator=g).to(dtype)
    torch.manual_seed(4)
    out = ops.dropout(x, 0.25, backend="cpu")
    (dx,) = torch.autograd.grad(out, x, grad)
    torch.manual_seed(4)  # the same seed: the reference draws the same mask
    ref = ops.dropout(x, 0.25, backend="reference")
    (ref_dx,) = torch.autograd.grad(ref, x, grad)
    assert torch.equal(out, ref) and torch.equal(dx, ref_dx)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_backward_equals_the_kernel(dtype):
    """Under torch.compile the backward is plain ops (fused by inductor): the same gradient,
    bit for bit, as the eager backward kernel, from the same mask."""
    def f(x, w, seed):  # the ops around the dropout are exact (a power of two, a product)
        return (torch.ops.addp.dropout(x * 2, 0.3, seed)[0] * w).sum()

    g = torch.Generator().manual_seed(5)
    x, w = (torch.randn(4, 33, 17, generator=g).to(dtype) for _ in range(2))
    seed = torch.tensor(123)
    grads, kernel_calls = [], []
    for fn in (f, torch.compile(f, fullgraph=True)):
        xi = x.clone().requires_grad_(True)
        with torch._inductor.config.patch(force_disable_caches=True):  # trace the backward of this code
            loss = fn(xi, w, seed)
        with torch.profiler.profile() as prof:
            loss.backward()
        grads.append(xi.grad)
        kernel_calls.append(sum(e.name == "addp::dropout_backward" for e in prof.events()))
    assert kernel_calls == [1, 0]
    assert grads[0].count_nonzero() < grads[0].numel() * 0.8  # dropped elements get no gradient
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@needs_c
def test_gradcheck_float64():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(77)
    assert torch.autograd.gradcheck(lambda x: torch.ops.addp.dropout(x, 0.4, seed)[0], (x,))


@needs_c
def test_generator_reproducibility():
    x = torch.randn(1000)
    a = ops.dropout(x, 0.5, generator=torch.Generator().manual_seed(3))
    b = ops.dropout(x, 0.5, generator=torch.Generator().manual_seed(3))
    c = ops.dropout(x, 0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@needs_c
def test_layers_use_philox_on_cpu_and_torch_on_request():
    """Every dropout of a Block runs the Philox kernel by default on CPU (same mask as calling
    ops.dropout after the same seed); dropout_backend("torch") gives torch's masks."""
    x = torch.randn(2, 5, 8)
    drop = layers.Dropout(0.5).train()
    torch.manual_seed(9)
    ours = drop(x)
    torch.manual_seed(9)
    assert torch.equal(ours, ops.dropout(x, 0.5))
    with layers.dropout_backend("torch"):
        torch.manual_seed(9)
        theirs = drop(x)
    torch.manual_seed(9)
    assert torch.equal(theirs, F.dropout(x, 0.5, True))
    assert isinstance(drop, torch.nn.Dropout) and drop.eval()(x) is x
    block = layers.Block(8, 2, drop=0.1, attn_drop=0.1)
    assert all(isinstance(m, layers.Dropout) for m in block.modules() if isinstance(m, torch.nn.Dropout))
    with pytest.raises(ValueError, match="dropout backend"):
        layers.set_dropout_backend("numpy")


@needs_c
def test_training_attention_dropout_statistics():
    """The attention path with Philox dropout drops probabilities at rate p and keeps the
    expectation: averaged over many draws it approaches the attention without dropout."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g) for _ in range(3))
    expected = layers.attention(q, k, v, 0.0)
    torch.manual_seed(0)
    mean = sum(layers.attention(q, k, v, 0.3) for _ in range(2000)) / 2000
    torch.testing.assert_close(mean, expected, atol=0.06, rtol=0)


@needs_c
def test_opcheck():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 9, dtype=dtype)[:, ::2]
        torch.library.opcheck(torch.ops.addp.dropout.default, (x, 0.3, torch.tensor(11)))
        torch.library.opcheck(torch.ops.addp.dropout_backward.default, (torch.randn(3, 5).to(dtype), x > 0, 0.3))
        # with a gradient: checks the registered autograd (forward op -> backward op)
        torch.library.opcheck(torch.ops.addp.dropout.default, (x.detach().requires_grad_(True), 0.3, torch.tensor(11)))
