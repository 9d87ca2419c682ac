"""The ADDP network: a pixel encoder and a token decoder with a tied MLM head.

    images x_t (B, 3, H, W) in [0, 1]  --encoder-->  features (B, N, C), N = token grid
    decoder input = [<MASK> slot | features, <MASK> where unreliable | reliable token embeddings]
    each part with its own learned position embedding (pixels, <MASK>, VQ tokens)
    --8 blocks--> MLM head tied to the token embedding --> logits (B, L, V)

The ViT encoder keeps the official module names at the top level (`patch_embed`, `blocks`,
`tokenizer_norm`, ...) so `addp-vit-base-16.pth` / `addp-vit-large-16.pth` load as they are;
any other timm model can be the encoder (`encoder="resnet50"`), under the `encoder.` prefix.
"""
from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Block, Dropout, MlmHead, init_transformer_weights
from ..errors import AddpError
from .registry import check_config, register_model_class, register_preset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TOKEN_INPUTS = ("decoder", "encoder_decoder", "none")


@dataclass(frozen=True)
class ADDPConfig:
    name: str = "addp_vit_base_patch16"
    kind: str = "addp"
    encoder: str = "vit"  # "vit" (official layout) or the name of any timm model
    image_size: int = 256
    patch_size: int = 16  # ViT patch size; the token grid is image_size // patch_size
    codebook_size: int = 1024
    extra_tokens: int = 1001  # vocabulary beyond the codebook (MAGE: 1000 classes + mask)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 768
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    drop_path: float = 0.0
    # where reliable tokens enter: "decoder" (paper), "encoder_decoder" (Tab. 5 ablation: also
    # appended to the encoder's input) or "none"
    token_input: str = "decoder"

    def __post_init__(self):
        check_config(self, ints=dict(image_size=1, patch_size=1, codebook_size=1, extra_tokens=0, embed_dim=1,
                                     depth=1, num_heads=1, decoder_embed_dim=1, decoder_depth=1,
                                     decoder_num_heads=1),
                     fractions=("dropout", "drop_path"), positive=("mlp_ratio",),
                     choices={"token_input": TOKEN_INPUTS},
                     multiples=(("image_size", "patch_size"), ("embed_dim", "num_heads"),
                                ("decoder_embed_dim", "decoder_num_heads")))
        if self.token_input != "none" and self.embed_dim != self.decoder_embed_dim:
            raise AddpError(f"{self.name}: token_input {self.token_input!r} needs embed_dim == decoder_embed_dim (the "
                            f"token embedding feeds the decoder directly), got {self.embed_dim} and {self.decoder_embed_dim}")
        if self.encoder != "vit" and not timm.is_model(self.encoder):
            raise AddpError(f"{self.name}: encoder {self.encoder!r} is neither 'vit' nor a timm model")
        if self.token_input == "encoder_decoder" and self.encoder != "vit":
            raise AddpError(f"{self.name}: token_input 'encoder_decoder' needs the ViT encoder, got {self.encoder!r}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.extra_tokens


def check_tokenizer_fits(config: ADDPConfig, tokenizer_config) -> None:
    """One-line AddpError unless the tokenizer turns this network's images into its token grid
    with its codebook."""
    stride = tokenizer_config.stride
    if config.image_size % stride or config.image_size // stride != config.grid_size:
        raise AddpError(f"the tokenizer {tokenizer_config.name} makes a {config.image_size // stride}x"
                        f"{config.image_size // stride} token grid from {config.image_size} px images (stride "
                        f"{stride}) but the network {config.name} has a {config.grid_size}x{config.grid_size} grid")
    if tokenizer_config.codebook_size != config.codebook_size:
        raise AddpError(f"the tokenizer {tokenizer_config.name} has {tokenizer_config.codebook_size} codebook "
                        f"entries but the network {config.name} predicts {config.codebook_size}")


class TimmEncoder(nn.Module):
    """Any timm model as the pixel encoder: its last feature map, resized to the token grid."""

    def __init__(self, name: str, grid_size: int, image_size: int):
        super().__init__()
        self.grid_size = grid_size
        self.body = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
        with torch.no_grad():
            probe = self.body.eval().forward_features(torch.zeros(1, 3, image_size, image_size))
        self.body.train()
        self.num_features = probe.shape[1] if probe.dim() == 4 else probe.shape[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> (B, grid*grid, C)."""
        f = self.body.forward_features(x)
        if f.dim() == 3:  # tokens (B, prefix + N, C): keep the patch tokens
            prefix = getattr(self.body, "num_prefix_tokens", 0)
            f = f[:, prefix:].transpose(1, 2)
            side = int(f.shape[-1] ** 0.5)
            f = f.reshape(f.shape[0], f.shape[1], side, side)
        if f.shape[-1] != self.grid_size:
            f = F.interpolate(f, size=(self.grid_size, self.grid_size), mode="bilinear", align_corners=False)
        return f.flatten(2).transpose(1, 2)


@register_model_class("addp")
class ADDP(nn.Module):
    config_class = ADDPConfig

    def __init__(self, config: ADDPConfig):
        if not isinstance(config, ADDPConfig):
            raise AddpError(f"ADDP takes an ADDPConfig (addp.create_model builds one by name), "
                            f"got {type(config).__name__}")
        super().__init__()
        c = self.config = config
        n = c.num_patches
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.token_emb = nn.Embedding(c.vocab_size, c.embed_dim)
        if c.encoder == "vit":
            self.patch_embed = timm.layers.PatchEmbed(c.image_size, c.patch_size, 3, c.embed_dim)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, c.embed_dim))
            self.tokenizer_norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
            self.tokenizer_dropout = Dropout(0.1)
            dpr = torch.linspace(0, c.drop_path, c.depth).tolist()
            self.blocks = nn.ModuleList(
                Block(c.embed_dim, c.num_heads, c.mlp_ratio, drop=c.dropout, attn_drop=c.dropout, drop_path=p)
                for p in dpr)
            self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
            encoder_width = c.embed_dim
        else:
            self.encoder = TimmEncoder(c.encoder, c.grid_size, c.image_size)
            encoder_width = self.encoder.num_features
        self.decoder_embed = nn.Linear(encoder_width, c.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n + 1, c.decoder_embed_dim))
        self.decoder_pos_mask_embed = nn.Parameter(torch.zeros(1, n + 1, c.decoder_embed_dim))
        if c.token_input == "encoder_decoder":
            self.pos_token_embed = nn.Parameter(torch.zeros(1, n + 1, c.embed_dim))
        if c.token_input != "none":
            self.decoder_pos_token_embed = nn.Parameter(torch.zeros(1, n + 1, c.decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(c.decoder_embed_dim, c.decoder_num_heads, c.mlp_ratio, drop=c.dropout, attn_drop=c.dropout)
            for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(c.decoder_embed_dim, eps=1e-6)
        self.mlm_layer = MlmHead(c.decoder_embed_dim, c.embed_dim, c.vocab_size)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for name, p in self.named_parameters(recurse=False):
            if name not in ("mask_token",):
                nn.init.normal_(p, std=0.02)  # position embeddings, cls token
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        skip = {id(m) for m in self.encoder.modules()} if hasattr(self, "encoder") else set()
        for m in self.modules():
            if id(m) not in skip:
                init_transformer_weights(m)
        if hasattr(self, "patch_embed"):
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    # -- encoder ---------------------------------------------------------------------------
    def forward_encoder(self, images: torch.Tensor, reliable_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> patch features (B, N, C) (the ViT's class slot dropped).

        reliable_tokens (B, R, D), token_input "encoder_decoder" only: appended to the
        encoder's input sequence, dropped from its output."""
        x = (images.clamp(0, 1) - self.pixel_mean) / self.pixel_std
        if hasattr(self, "encoder"):
            return self.encoder(x)
        x = self.patch_embed(x) + self.pos_embed[:, 1:]  # (B, N, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = self.tokenizer_dropout(self.tokenizer_norm(torch.cat([cls, x], dim=1)))  # (B, 1+N, D)
        n = x.shape[1]
        if reliable_tokens is not None:
            x = torch.cat([x, reliable_tokens], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x[:, 1:n])

    # -- decoder ---------------------------------------------------------------------------
    def forward_decoder(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                        num_reliable: int | None = None) -> torch.Tensor:
        """features (B, N, C), ids (B, N), mask (B, N) True = unreliable -> logits (B, N, V)."""
        x = self.decoder_blocks_output(features, ids, mask, num_reliable)
        # norm and head are per position: only the N image slots are needed (the official
        # code runs them on every slot and slices afterwards)
        return self.mlm_layer(self.decoder_norm(x[:, 1: 1 + mask.shape[1]]), self.token_emb.weight)

    def decoder_blocks_output(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                              num_reliable: int | None = None) -> torch.Tensor:
        """The decoder's sequence after its blocks: (B, 1 + N [+ R], Dd) -- the class slot,
        the N image slots, then (token_input "decoder") the R reliable-token slots."""
        B, N = mask.shape
        x = self.decoder_embed(features)  # (B, N, Dd)
        x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        x = torch.cat([self.mask_token.to(x.dtype).expand(B, 1, -1), x], dim=1)  # (B, 1+N, Dd)
        slot_mask = torch.cat([mask.new_zeros(B, 1), mask], dim=1)[..., None]
        x = x + torch.where(slot_mask, self.decoder_pos_mask_embed, self.decoder_pos_embed_learned)
        if self.config.token_input != "none":
            x = torch.cat([x, self._reliable_token_input(ids, mask, num_reliable)], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return x

    def _reliable_token_input(self, ids, mask, num_reliable, pos_embed=None):
        """Embeddings of the reliable tokens in position order + their position embedding
        (the decoder's, or `pos_embed`)."""
        if num_reliable is None:
            num_reliable = int((~mask[0]).sum())  # host sync; pass num_reliable in hot loops
        order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :num_reliable]  # (B, R)
        emb = self.token_emb(ids.gather(1, order))  # (B, R, D)
        pos = (self.decoder_pos_token_embed if pos_embed is None else pos_embed)[0, 1:][order]  # (B, R, D)
        return emb + pos

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                num_reliable: int | None = None) -> torch.Tensor:
        """Logits over the vocabulary for every token position.

        images: (B, 3, H, W) in [0, 1], the current x_t.
        ids:    (B, L) int64 token ids; only reliable positions are read.
        mask:   (B, L) bool, True = unreliable. Every row must have the same number of
                reliable tokens, `num_reliable` (computed with a host sync when omitted).
        returns (B, L, V) logits; the first `codebook_size` columns are the codebook.
        """
        if mask.shape[1] != self.config.num_patches:
            raise ValueError(f"mask has {mask.shape[1]} positions, the model's grid has {self.config.num_patches}")
        tokens = None
        if self.config.token_input == "encoder_decoder":
            tokens = self._reliable_token_input(ids, mask, num_reliable, self.pos_token_embed)
        return self.forward_decoder(self.forward_encoder(images, tokens), ids, mask, num_reliable)


@register_preset
def addp_vit_base_patch16() -> ADDPConfig:
    """ADDP ViT-B/16 at 256 px (addp-vit-base-16.pth)."""
    return ADDPConfig()


@register_preset
def addp_vit_large_patch16() -> ADDPConfig:
    """ADDP ViT-L/16 at 256 px (addp-vit-large-16.pth)."""
    return ADDPConfig(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=1024)


@register_preset
def addp_resnet50() -> ADDPConfig:
    """ADDP with timm's ResNet-50 as the pixel encoder (paper App. C.2)."""
    return ADDPConfig(encoder="resnet50")


@register_preset
def addp_vit_small() -> ADDPConfig:
    """32 px images, 8x8 tokens, 256-entry codebook: the CPU demo preset."""
    return ADDPConfig(image_size=32, patch_size=4, codebook_size=256, extra_tokens=2, embed_dim=64,
                 depth=4, num_heads=4, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, dropout=0.0)
