"""The VQ decoder and encoder, one speed step at a time, against the plain decoder (contiguous
NCHW, upsampled tensors built: reference_loop.vq_decode_grid) in the same run, at the
official layout (MAGE's VQGAN architecture, 256 px, 16x16 tokens; ch=32 and batch 2 on a CPU,
ch=128 and batch 64 on a GPU). ``python -m pytest -s benchmarks/test_bench_vq.py`` prints
the table; ADDP_BENCH_COMPILE=1 adds torch.compile as the sampler and the trainer's frozen
passes run it (inductor fuses GroupNorm + SiLU + the residual add; on a CPU the weights are
frozen into the graph and packed for oneDNN, addp.runtime.frozen) on a CPU, where compiling takes
minutes.

Variants:
  plain                the reference decoder, fp32
  channels-last        addp's decoder (channels-last inside), fp32: its 3x3 convolutions of
                       up to 128 channels by Winograd F(4x4, 3x3) (addp.ops.conv3x3) on a CPU
  ..., direct convs    the same with every convolution torch's (oneDNN's direct algorithm)
  ..., upsampled tensor built
                       the same with each nearest-2x upsample built before its conv (the
                       kernel otherwise reads the low-resolution input in place)
  + folded upsample    channels-last, each nearest-2x upsample + 3x3 conv computed as four
                       2x2 convs of the low-resolution input (4/9 of the multiply-adds, no
                       upsampled tensor) and interleaved: `upsample_conv` below
  plain bf16           the reference decoder under bf16 autocast (the bf16 variants run where
                       bf16 is native: addp.runtime.precision.native_bf16)
  channels-last bf16   addp's decoder under bf16 autocast
  compiled [bf16]      addp.runtime.frozen.compile_frozen of addp's decoder (frozen weights on a CPU)
  ..., torch GN+SiLU   the same with torch's GroupNorm then SiLU in place of the fused
                       addp.ops.group_norm_silu (compiled: inductor fuses the two itself)
"""
import os
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import addp
import addp.models.tokenizer as T
from addp.ops import winograd_conv
from addp.runtime.frozen import compile_frozen
from addp.runtime.precision import native_bf16

sys.path.insert(0, str(Path(__file__).parent))
import presets as P  # noqa: E402
import reference_loop as R  # noqa: E402

ON_GPU = P.DEVICE.type == "cuda"
CH, BATCH = (128, 64) if ON_GPU else (32, 2)
ROUNDS = int(os.environ.get("ADDP_BENCH_ROUNDS", 5))
BF16 = native_bf16(P.DEVICE)  # the bf16 variants where bf16 is native (elsewhere auto is fp32)
COMPILE = ON_GPU or os.environ.get("ADDP_BENCH_COMPILE") == "1"


def _fold_taps(w: torch.Tensor, dim: int) -> torch.Tensor:
    """3 kernel taps along ``dim`` -> the 2 taps each of the 2 nearest-2x phases sees: (2, ..., 2, ...)."""
    t0, t1, t2 = w.unbind(dim)
    return torch.stack([torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)])


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1) for a
    3x3 ``weight`` without the upsampled tensor: output pixel (2i+a, 2j+c) only sees input
    rows (i-1, i) or (i, i+1) and the same for columns, so each of the 4 phases is a 2x2 conv
    (taps summed); one conv with 4x the output channels and padding 1 computes all four."""
    B, C, H, W = x.shape
    Co = weight.shape[0]
    w = _fold_taps(_fold_taps(weight, 2), 4).transpose(0, 1).reshape(4 * Co, C, 2, 2)
    y = F.conv2d(x, w, None if bias is None else bias.repeat(4), padding=1).unflatten(1, (2, 2, Co))
    out = y.new_empty(B, H, 2, W, 2, Co)  # channels-last storage of (B, Co, 2H, 2W)
    for a in (0, 1):
        for c in (0, 1):
            out[:, :, a, :, c] = y[:, a, c, :, a:a + H, c:c + W].permute(0, 2, 3, 1)
    return out.view(B, 2 * H, 2 * W, Co).permute(0, 3, 1, 2)


def folded_decode(dec, z):
    """addp's decoder with every Upsample computed by ``upsample_conv``."""
    h = dec.mid.block_2(dec.mid.block_1(dec.conv_in(z.contiguous(memory_format=torch.channels_last))))
    for up in reversed(dec.up):
        for block in up.block:
            h = block(h)
        if hasattr(up, "upsample"):
            h = upsample_conv(h, up.upsample.conv.weight, up.upsample.conv.bias)
    return dec.conv_out(F.silu(dec.norm_out(h))).contiguous()


def test_upsample_conv_equals_upsample_then_conv():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 5, 7, generator=g)
    w, b = torch.randn(6, 8, 3, 3, generator=g), torch.randn(6, generator=g)
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)
    torch.testing.assert_close(upsample_conv(x, w, b), ref, rtol=1e-5, atol=1e-5)


def _bf16(fn):
    def run():
        with torch.autocast(P.DEVICE.type, dtype=torch.bfloat16):
            return fn()
    return run


def _torch_group_norm_silu(norm, x):
    return F.silu(norm(x))


def _unfused(fn):
    """fn run with the tokenizer's GroupNorm + SiLU as torch's two ops."""
    def run():
        fused, T._group_norm_silu = T._group_norm_silu, _torch_group_norm_silu
        try:
            return fn()
        finally:
            T._group_norm_silu = fused
    return run


def _built_upsample(fn):
    """fn run with each decoder Upsample building the upsampled tensor before its conv."""
    def run():
        in_place = T.Upsample.forward
        T.Upsample.forward = lambda self, x: self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        try:
            return fn()
        finally:
            T.Upsample.forward = in_place
    return run


def _direct(fn):
    """fn run with every VQ convolution torch's own (no Winograd kernel)."""
    def run():
        widest, winograd_conv.MAX_CHANNELS = winograd_conv.MAX_CHANNELS, 0
        try:
            return fn()
        finally:
            winograd_conv.MAX_CHANNELS = widest
    return run


def _report(title, variants, times, report_ratio):
    base = statistics.median(times[0])
    print(f"\n{title}")
    print("| variant | ms (median) | spread | vs plain |")
    print("|---|---|---|---|")
    for name, ts in zip(variants, times):
        m = statistics.median(ts)
        print(f"| {name} | {m * 1e3:.0f} | {(max(ts) - min(ts)) * 1e3:.0f} | {base / m:.2f}x |")
        if name != variants[0]:
            report_ratio(f"{title.split(',')[0]}: {name} vs plain", base / m, f"({m * 1e3:.0f} ms vs {base * 1e3:.0f} ms)")


@pytest.mark.study
@pytest.mark.parametrize("part", ["decoder", "encoder"])
def test_bench_vq(report_ratio, part):
    torch.manual_seed(0)
    tok = addp.create_model("vqgan_mage", ch=CH).to(P.DEVICE).eval()
    grid = tok.config.grid_size
    z = torch.randn(BATCH, tok.config.embed_dim, grid, grid, device=P.DEVICE)
    images = torch.rand(BATCH, 3, tok.config.image_size, tok.config.image_size, device=P.DEVICE)
    if part == "decoder":
        model, x = tok.decoder, z
        variants = {"plain": lambda: R.vq_decode_grid(tok.decoder, z),
                    "channels-last": lambda: tok.decoder(z),
                    "channels-last, direct convs": _direct(lambda: tok.decoder(z)),
                    "channels-last, upsampled tensor built": _built_upsample(lambda: tok.decoder(z)),
                    "channels-last + folded upsample": lambda: folded_decode(tok.decoder, z),
                    "channels-last, torch GN+SiLU": _unfused(lambda: tok.decoder(z))}
        if BF16:
            variants.update({"plain bf16": _bf16(lambda: R.vq_decode_grid(tok.decoder, z)),
                             "channels-last bf16": _bf16(lambda: tok.decoder(z)),
                             "channels-last bf16, torch GN+SiLU": _bf16(_unfused(lambda: tok.decoder(z)))})
    else:
        model, x = tok.encoder, images
        variants = {"plain": lambda: R.vq_encode_latents(tok.encoder, images),
                    "channels-last": lambda: tok.encoder(images),
                    "channels-last, direct convs": _direct(lambda: tok.encoder(images)),
                    "channels-last, torch GN+SiLU": _unfused(lambda: tok.encoder(images))}
        if BF16:
            variants.update({"plain bf16": _bf16(lambda: R.vq_encode_latents(tok.encoder, images)),
                             "channels-last bf16": _bf16(lambda: tok.encoder(images)),
                             "channels-last bf16, torch GN+SiLU": _bf16(_unfused(lambda: tok.encoder(images)))})
    with torch.no_grad():
        if COMPILE:
            compiled, direct, unfused = compile_frozen(model), compile_frozen(model), compile_frozen(model)
            variants["compiled"] = lambda: compiled(x)
            variants["compiled, direct convs"] = _direct(lambda: direct(x))
            variants["compiled, torch GN+SiLU"] = _unfused(lambda: unfused(x))
            if BF16:
                compiled_bf16, unfused_bf16 = compile_frozen(model), compile_frozen(model)
                variants["compiled bf16"] = _bf16(lambda: compiled_bf16(x))
                variants["compiled bf16, torch GN+SiLU"] = _bf16(_unfused(lambda: unfused_bf16(x)))
        times = P.interleaved_times(list(variants.values()), ROUNDS)
    _report(f"VQ {part}, MAGE layout ch={CH}, 256 px, B={BATCH}, {P.DEVICE.type}, "
            f"{torch.get_num_threads()} threads ({ROUNDS} interleaved rounds)", list(variants), times, report_ratio)
