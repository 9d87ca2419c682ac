"""The VQ tokenizer: MAGE's MaskGIT-style VQGAN (images in [0, 1] <-> codebook ids).

It differs from taming's VQGAN in ways that matter for loading `vqgan_jax_strongaug.ckpt`:
no attention blocks, no quant_conv/post_quant_conv, encoder downsampling by average pooling,
the encoder's input conv and every residual-block conv without bias, and residual blocks
that change width apply their 1x1 shortcut to the block's *output* (not its input).

Speed: the encoder and decoder run channels-last inside, whatever the layout of their input
(oneDNN and cuDNN convolutions, GroupNorm and nearest upsampling all have NHWC kernels), and
return contiguous tensors. On CPUs their float32 3x3 convolutions of up to 128 channels run by
Winograd's F(4x4, 3x3) (``Conv3x3``, ``addp.ops.conv3x3``). Measurements: docs/speed.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..errors import AddpError
from .registry import check_config, register_model_class, register_preset


@dataclass(frozen=True)
class VQConfig:
    name: str = "vqgan_mage"
    kind: str = "tokenizer"
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    codebook_size: int = 1024
    embed_dim: int = 256  # codebook vector width == encoder output channels
    image_size: int = 256  # the resolution it was trained at; any multiple of the stride works
    commitment_beta: float = 0.25
    norm_groups: int = 32  # GroupNorm groups (MAGE: 32)

    def __post_init__(self):
        check_config(self, ints=dict(in_channels=1, ch=1, num_res_blocks=1, codebook_size=1, embed_dim=1,
                                     image_size=1, norm_groups=1),
                     multiples=(("ch", "norm_groups"),))
        if not (isinstance(self.ch_mult, tuple) and self.ch_mult
                and all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in self.ch_mult)):
            raise AddpError(f"{self.name}: ch_mult must be a non-empty list of integers >= 1, got {self.ch_mult!r}")
        if not (isinstance(self.commitment_beta, (int, float)) and 0 <= self.commitment_beta < float("inf")):
            raise AddpError(f"{self.name}: commitment_beta must be a finite number >= 0, got {self.commitment_beta!r}")
        if self.image_size % self.stride:
            raise AddpError(f"{self.name}: image_size ({self.image_size}) must be a multiple of the stride "
                            f"{self.stride} (2 ** (len(ch_mult) - 1))")

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.stride


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _group_norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """silu(norm(x)) as one op: ``addp.ops.group_norm_silu``, fused on CPUs when no gradient is
    needed."""
    return ops.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


class Conv3x3(nn.Conv2d):
    """A 3x3, padding-1 ``nn.Conv2d`` (same parameters and state-dict keys) whose float32
    inference runs ``ops.conv3x3`` (Winograd F(4x4, 3x3) on CPUs, docs/speed.md); the
    transformed weight is kept between calls and rebuilt when the weight changes. ``forward``
    takes an optional ``residual`` added to the output (by the kernel as it writes it) and
    ``upsample``: convolve x upsampled 2x by nearest neighbour (read in place by the kernel)."""

    def __init__(self, in_ch: int, out_ch: int, bias: bool = True):
        super().__init__(in_ch, out_ch, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, upsample: bool = False) -> torch.Tensor:
        if not ops.winograd_conv.uses_kernel(x, self.weight, residual=residual):
            return ops.conv3x3_reference(x, self.weight, self.bias, residual, upsample)
        return torch.ops.addp.conv3x3_winograd(x, self._transformed_weight(), self.bias, residual, upsample)

    def _transformed_weight(self) -> torch.Tensor:
        if torch.compiler.is_compiling():  # frozen graphs fold it into a constant
            return ops.winograd_weight(self.weight)
        key = (self.weight.data_ptr(), self.weight._version)
        cached = self.__dict__.get("_winograd")  # a plain attribute: not in the state dict
        if cached is None or cached[0] != key:
            cached = self.__dict__["_winograd"] = (key, ops.winograd_weight(self.weight))
        return cached[1]


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = Conv3x3(in_ch, out_ch, bias=False)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = Conv3x3(out_ch, out_ch, bias=False)
        # MAGE's checkpoint: the shortcut maps out_ch -> out_ch and is applied to h.
        self.nin_shortcut = nn.Conv2d(out_ch, out_ch, 1, bias=False) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_group_norm_silu(self.norm1, x))
        if self.nin_shortcut is None:
            return self.conv2(_group_norm_silu(self.norm2, h), residual=x)
        h = self.conv2(_group_norm_silu(self.norm2, h))
        return self.nin_shortcut(h) + h


class _Level(nn.Module):
    """One resolution level: `block` (a list of ResBlocks) and an optional resampler."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv3x3(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, upsample=True)


class Encoder(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        ch_in = c.ch
        for level, mult in enumerate(c.ch_mult):
            blocks = []
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(ch_in, c.ch * mult, c.norm_groups))
                ch_in = c.ch * mult
            self.down.append(_Level(blocks))
        self.mid = nn.Module()
        self.mid.block_1 = ResBlock(ch_in, ch_in, c.norm_groups)
        self.mid.block_2 = ResBlock(ch_in, ch_in, c.norm_groups)
        self.norm_out = _norm(ch_in, c.norm_groups)
        self.conv_out = nn.Conv2d(ch_in, c.embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(_channels_last(x))
        for level, down in enumerate(self.down):
            for block in down.block:
                h = block(h)
            if level != len(self.down) - 1:
                h = F.avg_pool2d(h, 2)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(_group_norm_silu(self.norm_out, h)).contiguous()


class Decoder(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        ch_in = c.ch * c.ch_mult[-1]
        self.conv_in = Conv3x3(c.embed_dim, ch_in)
        self.mid = nn.Module()
        self.mid.block_1 = ResBlock(ch_in, ch_in, c.norm_groups)
        self.mid.block_2 = ResBlock(ch_in, ch_in, c.norm_groups)
        levels = []
        for level in reversed(range(len(c.ch_mult))):
            blocks = []
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(ch_in, c.ch * c.ch_mult[level], c.norm_groups))
                ch_in = c.ch * c.ch_mult[level]
            up = _Level(blocks)
            if level != 0:
                up.upsample = Upsample(ch_in)
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)  # up[0] is the full resolution, as in the checkpoint
        self.norm_out = _norm(ch_in, c.norm_groups)
        self.conv_out = nn.Conv2d(ch_in, c.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.block_1(self.conv_in(_channels_last(z))))
        for up in reversed(self.up):
            for block in up.block:
                h = block(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(_group_norm_silu(self.norm_out, h)).contiguous()


class Quantizer(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(c.codebook_size, c.embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / c.codebook_size, 1.0 / c.codebook_size)

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z: (N, D) -> ids (N,) of the nearest codebook vectors (squared L2, in fp32)."""
        z = z.float()
        e = self.embedding.weight.float()
        dist = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()  # (N, K)
        return dist.argmin(dim=1)


@register_model_class("tokenizer")
class VQTokenizer(nn.Module):
    """Images (B, 3, H, W) in [0, 1] <-> token ids (B, L), L = (H/stride) * (W/stride)."""

    config_class = VQConfig

    def __init__(self, config: VQConfig):
        if not isinstance(config, VQConfig):
            raise AddpError(f"VQTokenizer takes a VQConfig (addp.create_model builds one by name), "
                            f"got {type(config).__name__}")
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = Quantizer(config)

    @property
    def codebook(self) -> torch.Tensor:
        """(K, D) codebook vectors."""
        return self.quantize.embedding.weight

    def _check_images(self, images: torch.Tensor) -> None:
        s = self.config.stride
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise AddpError(f"expected a float image tensor, got {getattr(images, 'dtype', type(images).__name__)}")
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise AddpError(f"expected images (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}")
        if images.shape[-1] % s or images.shape[-2] % s:
            raise AddpError(f"image size {tuple(images.shape[-2:])} is not a multiple of the tokenizer stride {s}")

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> continuous latents (B, D, h, w) before quantisation."""
        self._check_images(images)
        return self.encoder(images)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> ids (B, h*w), row-major over the token grid."""
        z = self.encode_latents(images)
        B, D, h, w = z.shape
        ids = self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, D))
        return ids.reshape(B, h * w)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, D) codebook vectors."""
        return F.embedding(ids, self.codebook)

    def decode_embeddings(self, emb: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, L, D) token embeddings (or (B, D, h, w)) -> images (B, 3, H, W), about [0, 1]."""
        if emb.dim() == 3:
            B, L, D = emb.shape
            h, w = grid if grid is not None else _square_grid(L)
            emb = emb.transpose(1, 2).reshape(B, D, h, w)
        return self.decoder(emb.to(self.decoder.conv_in.weight.dtype))

    def decode_ids(self, ids: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, L) or (B, h, w) ids -> images (B, 3, H, W)."""
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dim() not in (2, 3):
            raise AddpError(f"ids must be a (B, L) or (B, h, w) integer tensor, got "
                            f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        K = self.codebook.shape[0]
        if ids.numel() and not (int(ids.min()) >= 0 and int(ids.max()) < K):
            raise AddpError(f"ids must lie in [0, {K}) (the codebook's entries), got {int(ids.min())}..{int(ids.max())}")
        if ids.dim() == 3:
            grid, ids = tuple(ids.shape[1:]), ids.flatten(1)
        return self.decode_embeddings(self.embed_ids(ids), grid)

    def forward(self, images: torch.Tensor):
        """Training pass: returns (reconstruction, ids (B, L), codebook + commitment loss)."""
        z = self.encode_latents(images)
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)
        ids = self.quantize.nearest(flat.detach())
        z_q = self.codebook[ids]
        vq_loss = F.mse_loss(z_q, flat.detach()) + self.config.commitment_beta * F.mse_loss(flat, z_q.detach())
        z_q = flat + (z_q - flat).detach()  # straight-through estimator
        recon = self.decoder(z_q.reshape(B, h, w, D).permute(0, 3, 1, 2))
        return recon, ids.reshape(B, h * w), vq_loss


def _square_grid(L: int) -> tuple[int, int]:
    side = math.isqrt(L)
    if side * side != L:
        raise AddpError(f"{L} tokens do not form a square grid; pass grid=(h, w)")
    return side, side


@register_preset
def vqgan_mage() -> VQConfig:
    """MAGE's VQGAN (vqgan_jax_strongaug.ckpt): 256 px -> 16x16 tokens, codebook 1024 x 256."""
    return VQConfig()


@register_preset
def vqgan_small() -> VQConfig:
    """32 px -> 8x8 tokens, codebook 256 x 32, 0.2 M parameters: trains on a CPU in minutes."""
    return VQConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, codebook_size=256,
                    embed_dim=32, image_size=32)
