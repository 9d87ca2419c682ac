"""GroupNorm + SiLU: the compiled CPU kernel against its plain-PyTorch reference (random
shapes, groups, dtypes, layouts, ISAs), the routing (autograd, float64, other devices), and the
VQ networks that use it (fused decoder == reference decoder, channels-last == contiguous)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_c

from addp import ops
from addp.models.tokenizer import VQConfig, VQTokenizer

# Largest difference allowed, relative to max(|y|, 1). bf16/fp16: two units in the last place
# (both sides compute in float32 and round once). float32: the two compute their statistics
# differently (torch in float32, the kernel in double), a few float32 units apart.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -6, torch.float16: 2.0 ** -9}


def _random_case(g, dtype, layout):
    groups = int(torch.randint(1, 5, (), generator=g))
    C = groups * int(torch.randint(1, 21, (), generator=g))
    H, W = (int(s) for s in torch.randint(1, 40, (2,), generator=g))
    N = int(torch.randint(1, 4, (), generator=g))
    mean, spread = float(torch.randn((), generator=g)) * 4, float(torch.rand((), generator=g)) * 3 + 0.1
    x = (torch.randn(N, C, H, W, generator=g) * spread + mean).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = x[..., ::2]
    weight, bias = torch.randn(C, generator=g), torch.randn(C, generator=g)
    return x, weight, bias, groups


@needs_c
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_equals_reference(dtype, layout):
    g = torch.Generator().manual_seed(7 + int(dtype.itemsize))
    for _ in range(8):
        x, weight, bias, groups = _random_case(g, dtype, layout)
        out = torch.ops.addp.group_norm_silu(x, weight, bias, groups, 1e-6)
        ref = ops.group_norm_silu_reference(x, weight, bias, groups, 1e-6)
        assert out.dtype == dtype and out.shape == x.shape
        if layout != "sliced":
            assert out.stride() == x.stride()
        scale = ref.float().abs().clamp_min(1.0)
        assert ((out.float() - ref.float()).abs() / scale).max() <= TOL[dtype], (x.shape, groups)


@needs_c
def test_no_affine_and_other_ranks():
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 8), (2, 6, 50), (2, 4, 3, 5, 6)]:
        x = torch.randn(shape, generator=g) * 2 + 1
        torch.testing.assert_close(torch.ops.addp.group_norm_silu(x, None, None, 2, 1e-5),
                                   ops.group_norm_silu_reference(x, None, None, 2, 1e-5), rtol=1e-5, atol=1e-5)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_stays_in_its_group(dtype):
    """A NaN makes its (sample, group) NaN, as in the reference, and no other output."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 64, 9, 11, generator=g).to(dtype)
    x[1, 20, 3, 4] = float("nan")
    for layout in (x, x.contiguous(memory_format=torch.channels_last)):
        out = torch.ops.addp.group_norm_silu(layout, None, None, 8, 1e-6)
        ref = ops.group_norm_silu_reference(layout, None, None, 8, 1e-6)
        assert out.isnan()[1, 16:24].all() and out.isnan().sum() == 8 * 9 * 11
        torch.testing.assert_close(out.float(), ref.float(), equal_nan=True, rtol=TOL[dtype], atol=TOL[dtype])


@needs_c
def test_large_mean_small_spread():
    """Statistics stay accurate when a group's mean is far from its spread (1000 +- 0.01: no
    E[x^2] - E[x]^2 cancellation): the float32 kernel stays within 5e-4 of the float64
    reference, where torch's float32 GroupNorm is about 1e-2 off."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 16, 64, 64, generator=g) * 0.01 + 1000).contiguous(memory_format=torch.channels_last)
    w, b = torch.ones(16), torch.zeros(16)
    exact = ops.group_norm_silu_reference(x.double(), w.double(), b.double(), 8, 0.0)
    for layout in (x, x.contiguous()):
        out = torch.ops.addp.group_norm_silu(layout, w, b, 8, 0.0)
        torch.testing.assert_close(out.double(), exact, rtol=0, atol=5e-4)


@needs_c
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_same_on_every_isa_and_thread_count(isa):
    """The narrower ISAs and one thread agree with the widest ISA (another process: the ISA is
    read per call, the thread count before any parallel work). AVX-512 without its bfloat16
    conversion instruction gives the same bits as with it (the same rounding to nearest even)."""
    code = ("import sys, torch, addp.ops\n"
            "torch.set_num_threads(1)\n"
            "g = torch.Generator().manual_seed(3)\n"
            "x = (torch.randn(2, 48, 37, 29, generator=g) * 3 + 2).to(torch.bfloat16)\n"
            "y = torch.cat([torch.ops.addp.group_norm_silu(x.contiguous(memory_format=torch.channels_last), "
            "None, None, 16, 1e-6).float().flatten(), torch.ops.addp.group_norm_silu(x, None, None, 16, 1e-6)"
            ".float().flatten()])\n"
            "torch.save(y, sys.argv[1])\n")
    path = os.path.join(os.environ.get("PYTEST_TMPDIR", "/tmp"), f"norm_silu_{isa}_{os.getpid()}.pt")
    subprocess.run([sys.executable, "-c", code, path], env={**os.environ, "ADDP_CPU_ISA": isa}, check=True)
    narrow = torch.load(path, weights_only=True)
    os.remove(path)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 48, 37, 29, generator=g) * 3 + 2).to(torch.bfloat16)
    wide = torch.cat([torch.ops.addp.group_norm_silu(x.contiguous(memory_format=torch.channels_last), None, None,
                                                     16, 1e-6).float().flatten(),
                      torch.ops.addp.group_norm_silu(x, None, None, 16, 1e-6).float().flatten()])
    if isa == "avx512":
        torch.testing.assert_close(narrow, wide, rtol=0, atol=0)
    else:
        assert ((narrow - wide).abs() / wide.abs().clamp_min(1)).max() <= TOL[torch.bfloat16]


def test_gradient_and_float64_run_the_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 5, 5, generator=g, requires_grad=True)
    w = torch.randn(8, generator=g, requires_grad=True)
    y = ops.group_norm_silu(x, w, None, 4)
    y.square().sum().backward()
    x2, w2 = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    F.silu(F.group_norm(x2, 4, w2, None, 1e-5)).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    x64 = torch.randn(2, 8, 5, dtype=torch.float64, generator=g)
    torch.testing.assert_close(ops.group_norm_silu(x64, None, None, 2), F.silu(F.group_norm(x64, 2)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="not divisible"):
        ops.group_norm_silu(torch.randn(2, 6, 3), None, None, 4)
    with pytest.raises(ValueError, match="floating-point"):
        ops.group_norm_silu(torch.arange(12).reshape(2, 6), None, None, 2)


@needs_c
def test_opcheck():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.addp.group_norm_silu, (x, torch.randn(8, generator=g), None, 4, 1e-6),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def _tokenizer():
    torch.manual_seed(0)
    cfg = VQConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, codebook_size=64, embed_dim=16, image_size=32)
    return VQTokenizer(cfg).eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.08)])
def test_vq_decoder_and_encoder_match_the_unfused_networks(monkeypatch, dtype, tol):
    """The tokenizer with the fused op (fp32; bf16 autocast) == the same weights with torch's
    GroupNorm and SiLU in float32, on the bundled digits: fp32 within 1e-4, bf16 within 0.08 of
    the [0, 1] image scale (bf16 convolutions round every layer)."""
    from addp.models import tokenizer as T
    from addp.training.data import load_digits

    tok = _tokenizer()
    images = load_digits("heldout", image_size=32)[0][:8]
    with torch.no_grad():
        emb = tok.embed_ids(tok.encode(images))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            fused_img, fused_lat = tok.decode_embeddings(emb).float(), tok.encoder(images).float()
        monkeypatch.setattr(T, "_group_norm_silu", lambda norm, x: F.silu(norm(x.float())))
        plain_img, plain_lat = tok.decode_embeddings(emb), tok.encoder(images)
    assert (fused_img - plain_img).abs().max() <= tol * max(1.0, plain_img.abs().max())
    assert (fused_lat - plain_lat).abs().max() <= tol * max(1.0, plain_lat.abs().max())


def test_channels_last_and_contiguous_inputs_decode_the_same():
    tok = _tokenizer()
    z = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        a = tok.decoder(z.contiguous())
        b = tok.decoder(z.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
