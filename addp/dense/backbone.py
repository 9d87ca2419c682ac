"""The ADDP encoder as a ViTDet-style backbone for dense tasks.

    images (B, 3, H, W), ImageNet-normalised --patch_embed + pos_embed (interpolated to H/p x W/p)
    --> [cls | patch tokens] --tokenizer_norm--> blocks (window attention in most, global in a
    few; decomposed relative position bias) --> maps (B, C, H/p, W/p) of the blocks asked for

The parameter names are the ADDP encoder's (`patch_embed`, `cls_token`, `pos_embed`,
`tokenizer_norm`, `blocks.*`, `norm`), so an official `addp-vit-*-16.pth` or our ADDP
component loads by name; the only new parameters are each block's `attn.rel_pos_h` /
`attn.rel_pos_w`, zero-initialised: with them at zero and every block global, the last map is
the plain encoder's output. The class token is kept, as in pretraining: it attends to every
token in global blocks and to itself only in window blocks (ViTDet drops it).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, resample_abs_pos_embed

from ..errors import CheckpointError
from ..models.registry import check_config

log = logging.getLogger(__name__)
ENCODER_PREFIXES = ("patch_embed.", "blocks.", "tokenizer_norm.", "norm.")
ENCODER_KEYS = ("cls_token", "pos_embed")
# "interpolate": the stored grid stretched over the input (ViTDet, BEiT); "tile": the stored grid
# repeated, so every pretraining-sized tile of the input sees the positions pretraining saw
ABS_POS = ("interpolate", "tile")


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "vitdet_base_patch16"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 16
    mlp_ratio: float = 4.0
    pretrain_size: int = 256  # the image size of pretraining: the stored position grid
    image_size: int = 1024  # the input size the relative position tables are made for
    window_size: int = 14
    global_blocks: tuple = (2, 5, 8, 11)  # ViTDet's split for ViT-B
    out_indices: tuple = (11,)  # blocks whose output maps are returned (the last one normed)
    drop_path: float = 0.1
    rel_pos: bool = True
    abs_pos: str = "interpolate"  # how the stored position grid covers a larger input (ABS_POS)

    def __post_init__(self):
        check_config(self, ints=dict(embed_dim=1, depth=1, num_heads=1, patch_size=1, pretrain_size=1,
                                     image_size=1, window_size=1),
                     fractions=("drop_path",), positive=("mlp_ratio",), choices={"abs_pos": ABS_POS},
                     multiples=(("embed_dim", "num_heads"), ("image_size", "patch_size"),
                                ("pretrain_size", "patch_size")))
        for field in ("global_blocks", "out_indices"):
            bad = [i for i in getattr(self, field) if not 0 <= i < self.depth]
            if bad:
                raise CheckpointError(f"{self.name}: {field} {bad} outside blocks 0..{self.depth - 1}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def rel_pos_table(q_size: int, k_size: int, table: torch.Tensor) -> torch.Tensor:
    """(2*max(q,k)-1, Dh) table (resampled linearly when it was made for another size) ->
    (q_size, k_size, Dh): the embedding of each query-key offset along one axis."""
    span = 2 * max(q_size, k_size) - 1
    if table.shape[0] != span:
        table = F.interpolate(table.t()[None], size=span, mode="linear")[0].t()
    q = torch.arange(q_size, device=table.device)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size, device=table.device)[None, :] * max(q_size / k_size, 1.0)
    return table[(q - k + (k_size - 1) * max(q_size / k_size, 1.0)).long()]


def rel_pos_bias(q: torch.Tensor, hw: tuple, table_h: torch.Tensor, table_w: torch.Tensor) -> torch.Tensor:
    """Decomposed relative position bias (MViTv2 / ViTDet): q (B, heads, h*w, Dh) ->
    (B, heads, h*w, h*w) = q . R_h[dy] + q . R_w[dx]."""
    h, w = hw
    B, H, _, D = q.shape
    r = q.reshape(B, H, h, w, D)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", r, rel_pos_table(h, h, table_h))  # (B, H, h, w, h)
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", r, rel_pos_table(w, w, table_w))  # (B, H, h, w, w)
    return (bias_h[..., :, None] + bias_w[..., None, :]).reshape(B, H, h * w, h * w)


def window_partition(x: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple]:
    """(B, h, w, C) -> (B * windows, size*size, C), zero-padded to whole windows; and (hp, wp)."""
    B, h, w, C = x.shape
    ph, pw = -h % size, -w % size
    x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(B, hp // size, size, wp // size, size, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size * size, C), (hp, wp)


def window_unpartition(x: torch.Tensor, size: int, padded: tuple, hw: tuple, batch: int) -> torch.Tensor:
    """The inverse of window_partition: (B * windows, size*size, C) -> (B, h, w, C)."""
    (hp, wp), (h, w) = padded, hw
    x = x.view(batch, hp // size, wp // size, size, size, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, hp, wp, -1)[:, :h, :w]


class Attention(nn.Module):
    """Multi-head attention over [cls | h*w patch tokens], global or within windows."""

    def __init__(self, dim: int, num_heads: int, window: int, rel_grid: int, rel_pos: bool):
        super().__init__()
        self.num_heads, self.window = num_heads, window  # window 0: global
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        if rel_pos:
            size = window or rel_grid
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, dim // num_heads))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, dim // num_heads))

    def _attend(self, x: torch.Tensor, hw: tuple, prefix: int) -> torch.Tensor:
        """x (B, prefix + h*w, C) -> (B, prefix + h*w, C) before the projection."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = None
        if hasattr(self, "rel_pos_h"):
            bias = rel_pos_bias(q[:, :, prefix:], hw, self.rel_pos_h, self.rel_pos_w)
            bias = F.pad(bias, (prefix, 0, prefix, 0)).to(q.dtype)  # no bias to or from the class token
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, heads, N, Dh)
        return out.transpose(1, 2).reshape(B, N, C)

    def forward(self, x: torch.Tensor, hw: tuple) -> torch.Tensor:
        """x (B, 1 + h*w, C) -> (B, 1 + h*w, C)."""
        if not self.window:
            return self.proj(self._attend(x, hw, 1))
        B, _, C = x.shape
        cls, grid = x[:, :1], x[:, 1:].reshape(B, *hw, C)
        windows, padded = window_partition(grid, self.window)
        out = self._attend(windows, (self.window, self.window), 0)
        out = window_unpartition(out, self.window, padded, hw, B).reshape(B, -1, C)
        cls_out = F.linear(cls, *(t.chunk(3)[2] for t in (self.qkv.weight, self.qkv.bias)))  # attends to itself: v
        return self.proj(torch.cat([cls_out, out], dim=1))


class Block(nn.Module):
    """Pre-norm block with the ADDP encoder's names (norm1, attn.qkv/proj, norm2, mlp.fc1/fc2)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, window: int,
                 rel_grid: int, rel_pos: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, window, rel_grid, rel_pos)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, hw: tuple) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViTDetBackbone(nn.Module):
    def __init__(self, config: BackboneConfig):
        super().__init__()
        c = self.config = config
        self.patch_embed = PatchEmbed(c.pretrain_size, c.patch_size, 3, c.embed_dim, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (c.pretrain_size // c.patch_size) ** 2, c.embed_dim))
        self.tokenizer_norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        dpr = torch.linspace(0, c.drop_path, c.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(c.embed_dim, c.num_heads, c.mlp_ratio, dpr[i], 0 if i in c.global_blocks else c.window_size,
                  c.grid, c.rel_pos) for i in range(c.depth))
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        self.apply(_init)

    @property
    def num_layers(self) -> int:
        return self.config.depth

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, 3, H, W) normalised, H and W multiples of the patch -> one (B, C, H/p, W/p) map
        per `out_indices` entry; the last block's map through `norm`, as the encoder's output."""
        B, _, H, W = x.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise CheckpointError(f"input {H}x{W} is not a multiple of the patch size {p}")
        hw = (H // p, W // p)
        pos = self.position_table(hw)  # (1, 1 + h*w, C)
        x = self.patch_embed(x) + pos[:, 1:]  # (B, h*w, C)
        x = torch.cat([(self.cls_token + pos[:, :1]).expand(B, -1, -1), x], dim=1)
        x = self.tokenizer_norm(x)
        maps = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, hw)
            if i in self.config.out_indices:
                y = self.norm(x) if i == self.config.depth - 1 else x
                maps.append(y[:, 1:].transpose(1, 2).reshape(B, -1, *hw))
        return maps

    def position_table(self, hw: tuple) -> torch.Tensor:
        """The absolute position embeddings of a (h, w) patch grid: (1, 1 + h*w, C)."""
        side = self.patch_embed.grid_size
        if self.config.abs_pos == "interpolate":
            return resample_abs_pos_embed(self.pos_embed, list(hw), list(side), num_prefix_tokens=1)
        (h, w), C = hw, self.pos_embed.shape[-1]
        grid = self.pos_embed[:, 1:].reshape(1, *side, C)
        grid = grid.repeat(1, -(-h // side[0]), -(-w // side[1]), 1)[:, :h, :w]  # whole tiles, then cropped
        return torch.cat([self.pos_embed[:, :1], grid.reshape(1, h * w, C)], dim=1)

    def layer_id(self, name: str) -> int:
        """0 for the embeddings, i + 1 for block i, depth + 1 after (layer-wise lr decay)."""
        if name.startswith(("patch_embed", "cls_token", "pos_embed", "tokenizer_norm")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.config.depth + 1


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ADDP encoder's weights of an ADDP state dict (ours or an official release's)."""
    return {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES) or k in ENCODER_KEYS}


def load_encoder(backbone: ViTDetBackbone, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load the ADDP encoder of `state` into `backbone` strictly: every encoder weight must
    fit, and only the relative position tables may be missing (they stay at zero). Returns
    and logs once the names of those new parameters."""
    enc = encoder_state(state)
    if "pos_embed" not in enc or "patch_embed.proj.weight" not in enc:
        raise CheckpointError(f"{source}: holds no ADDP ViT encoder (no patch_embed/pos_embed keys)")
    own = backbone.state_dict()
    unexpected = [k for k in enc if k not in own]
    shapes = [k for k in enc if k in own and own[k].shape != enc[k].shape]
    missing = [k for k in own if k not in enc]
    new = [k for k in missing if k.endswith(("attn.rel_pos_h", "attn.rel_pos_w"))]
    if unexpected or shapes or len(new) != len(missing):
        detail = (f"unexpected {unexpected[:3]}" if unexpected else
                  f"shape of {shapes[0]}: {tuple(enc[shapes[0]].shape)} vs {tuple(own[shapes[0]].shape)}" if shapes
                  else f"missing {[k for k in missing if k not in new][:3]}")
        raise CheckpointError(f"{source}: the encoder does not fit {backbone.config.name} ({detail})")
    with torch.no_grad():
        for k, v in enc.items():
            own[k].copy_(v)
    if new:
        log.info(f"[backbone] {len(new)} new parameters, zero-initialised: "
                 f"blocks.*.attn.rel_pos_h/rel_pos_w ({len(new) // 2} blocks)")
    return new


# (width, depth) -> (global blocks, UperNet blocks): ViTDet's split for ViT-B/L, BEiT's four
# UperNet blocks; the demo encoder (4 blocks, patch 4: UperNet takes its last map) alternates
# window and global, last one global
SPLITS = {(768, 12): ((2, 5, 8, 11), (3, 5, 7, 11)), (1024, 24): ((5, 11, 17, 23), (7, 11, 15, 23)),
          (64, 4): ((1, 3), (3,))}


def backbone_config_for(addp_config, image_size: int, task: str, drop_path: float = 0.1,
                        window_size: int | None = None, rel_pos: bool = True,
                        abs_pos: str = "interpolate") -> BackboneConfig:
    """The backbone of an ADDP ViT encoder for "detection" (last map) or "segmentation" (four
    blocks' maps). The window is 14 (ViTDet) for patch-16 encoders, else the pretraining grid."""
    c = addp_config
    if getattr(c, "encoder", "vit") != "vit":
        raise CheckpointError(f"{c.name}: dense tasks need a ViT encoder, not {c.encoder!r}")
    quarter = [(i + 1) * c.depth // 4 - 1 for i in range(4)]
    global_blocks, uper = SPLITS.get((c.embed_dim, c.depth), (tuple(quarter), tuple(quarter)))
    window = window_size or (14 if c.patch_size == 16 else c.image_size // c.patch_size)
    # a patch finer than 16 leaves the last map fine enough for every pyramid level (necks.py)
    out = (c.depth - 1,) if task == "detection" or c.patch_size < 16 else uper
    return BackboneConfig(name=f"vitdet_{c.embed_dim}x{c.depth}_p{c.patch_size}", embed_dim=c.embed_dim,
                          depth=c.depth, num_heads=c.num_heads, patch_size=c.patch_size, mlp_ratio=c.mlp_ratio,
                          pretrain_size=c.image_size, image_size=image_size, window_size=window,
                          global_blocks=tuple(global_blocks), out_indices=tuple(out), drop_path=drop_path,
                          rel_pos=rel_pos, abs_pos=abs_pos)
