"""The VQ tokenizer's fast path (channels-last inside, any input layout) against the plain
contiguous-layout VQGAN passes of the official-style reference loop (torch.nn.functional on
the same weights, upsampled tensors built), and the device precision decision."""
import sys
from pathlib import Path

import pytest
import torch

import addp
from addp.runtime.precision import autocast_dtype, resolve_precision

sys.path.append(str(Path(__file__).parents[2] / "benchmarks"))  # after tests/: benchmarks has a conftest too
from reference_loop import vq_decode_grid as reference_decode  # noqa: E402
from reference_loop import vq_encode_latents as reference_encode  # noqa: E402

# bf16 autocast of the decoder against the fp32 reference (random weights, MAGE layout at
# width 32, 2x2 tokens): each of the ~30 convolutions rounds its inputs to 8 mantissa bits.
# Measured over seeds 0-2: relative RMS error 0.036-0.042, max error 0.039-0.056 of max |ref|;
# the bounds are 2x that.
BF16_REL_RMS, BF16_MAX_REL = 0.08, 0.12


@pytest.fixture(scope="module")
def tok():
    torch.manual_seed(0)
    # the MAGE VQGAN layout (ch_mult 1,1,2,2,4, two blocks per level) at a width and size a
    # test can run: 32 px images, 2x2 tokens
    return addp.create_model("vqgan_mage", ch=32, image_size=32).eval()


@torch.no_grad()
def test_decoder_equals_the_reference_in_fp32(tok):
    z = torch.randn(2, 256, 2, 2)
    ref = reference_decode(tok.decoder, z)
    out = tok.decoder(z)
    assert out.shape == ref.shape == (2, 3, 32, 32) and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@torch.no_grad()
def test_encoder_equals_the_reference_in_fp32(tok):
    x = torch.rand(2, 3, 32, 32)
    ref = reference_encode(tok.encoder, x)
    out = tok.encoder(x)
    assert out.shape == ref.shape == (2, 256, 2, 2) and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@torch.no_grad()
def test_decoder_under_bf16_autocast_is_within_the_stated_tolerance(tok):
    z = torch.randn(2, 256, 2, 2)
    ref = reference_decode(tok.decoder, z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = tok.decoder(z)
    assert low.dtype == torch.bfloat16
    err = low.float() - ref
    assert err.norm() <= BF16_REL_RMS * ref.norm(), (err.norm() / ref.norm()).item()
    assert err.abs().max() <= BF16_MAX_REL * ref.abs().max(), (err.abs().max() / ref.abs().max()).item()


@torch.no_grad()
def test_channels_last_and_contiguous_inputs_give_the_same_output(tok):
    z = torch.randn(2, 256, 2, 2)
    z_cl = z.contiguous(memory_format=torch.channels_last)
    assert not z_cl.is_contiguous()
    assert torch.equal(tok.decoder(z), tok.decoder(z_cl))
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(tok.encoder(x), tok.encoder(x.contiguous(memory_format=torch.channels_last)))
    # the token-sequence entry point (B, L, D) agrees with the grid one
    emb = z.flatten(2).transpose(1, 2)
    assert torch.equal(tok.decode_embeddings(emb), tok.decoder(z))


def test_training_pass_gradients_match_the_reference():
    torch.manual_seed(0)
    tok = addp.create_model("vqgan_mage", ch=32, image_size=32)
    z = torch.randn(1, 256, 2, 2, requires_grad=True)
    tok.decoder(z).square().mean().backward()
    fast = [p.grad.clone() for p in tok.decoder.parameters()] + [z.grad.clone()]
    tok.zero_grad()
    z.grad = None
    reference_decode(tok.decoder, z).square().mean().backward()
    ref = [p.grad for p in tok.decoder.parameters()] + [z.grad]
    # some gradients are zero up to rounding (a conv bias followed by GroupNorm): the absolute
    # tolerance is relative to the largest gradient of all
    scale = max(g.abs().max().item() for g in ref)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * scale)


def _cpu_flags() -> set:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())


def test_auto_precision_is_bf16_exactly_where_the_hardware_has_it():
    native = bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")
    assert autocast_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else None)
    assert resolve_precision("auto", torch.device("cpu"), training=True) == "fp32"  # the demo's measured setting
    for explicit, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        assert resolve_precision(explicit, torch.device("cpu")) == explicit
        assert resolve_precision(explicit, torch.device("cpu"), training=True) == explicit
        assert autocast_dtype(explicit, "cpu") is dtype
