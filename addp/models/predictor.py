"""The token predictor: MAGE's ViT over VQ token embeddings (frozen during ADDP training).

Given the reliable token ids of a step and the mask of unreliable positions, it returns
logits over the codebook at every position. Module names follow `models_mage.py` so
`mage-vitb-1600.pth` / `mage-vitl-1600.pth` load as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .layers import Block, Dropout, MlmHead, init_transformer_weights
from ..errors import AddpError
from .registry import check_config, register_model_class, register_preset


@dataclass(frozen=True)
class PredictorConfig:
    name: str = "mage_vit_base_patch16"
    kind: str = "predictor"
    codebook_size: int = 1024
    num_classes: int = 1000  # MAGE reserves class tokens; one of them is the "fake class" input
    seq_len: int = 256  # token grid positions (16 x 16)
    max_positions: int = 257  # the position table of the checkpoint (seq_len + 1 class slot)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 768
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.1

    def __post_init__(self):
        check_config(self, ints=dict(codebook_size=1, num_classes=1, seq_len=1, max_positions=1, embed_dim=1,
                                     depth=1, num_heads=1, decoder_embed_dim=1, decoder_depth=1,
                                     decoder_num_heads=1),
                     fractions=("dropout",), positive=("mlp_ratio",),
                     multiples=(("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")))
        if self.max_positions < self.seq_len + 1:
            raise AddpError(f"{self.name}: max_positions ({self.max_positions}) must be at least seq_len + 1 "
                            f"({self.seq_len + 1})")

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.num_classes + 1

    @property
    def fake_class_id(self) -> int:
        # MAGE uses id 1100 with a 1024 codebook: the 77th class token.
        return self.codebook_size + min(76, self.num_classes - 1)

    @property
    def mask_id(self) -> int:
        return self.vocab_size - 1


class TokenEmbedding(nn.Module):
    """BERT-style input embedding: word + learned position, LayerNorm, dropout."""

    def __init__(self, vocab_size: int, dim: int, max_positions: int, dropout: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(max_positions, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = Dropout(dropout)
        nn.init.normal_(self.word_embeddings.weight, std=0.02)
        nn.init.normal_(self.position_embeddings.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(ids) + self.position_embeddings.weight[: ids.shape[1]]
        return self.dropout(self.LayerNorm(x))


@register_model_class("predictor")
class MAGEPredictor(nn.Module):
    config_class = PredictorConfig

    def __init__(self, config: PredictorConfig):
        if not isinstance(config, PredictorConfig):
            raise AddpError(f"MAGEPredictor takes a PredictorConfig (addp.create_model builds one by name), "
                            f"got {type(config).__name__}")
        super().__init__()
        c = self.config = config
        self.token_emb = TokenEmbedding(c.vocab_size, c.embed_dim, c.max_positions, c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.embed_dim, c.num_heads, c.mlp_ratio, drop=c.dropout, attn_drop=c.dropout)
            for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, c.seq_len + 1, c.decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(c.decoder_embed_dim, c.decoder_num_heads, c.mlp_ratio, drop=c.dropout, attn_drop=c.dropout)
            for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(c.decoder_embed_dim, eps=1e-6)
        self.mlm_layer = MlmHead(c.decoder_embed_dim, c.embed_dim, c.vocab_size)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        nn.init.normal_(self.decoder_pos_embed_learned, std=0.02)
        self.apply(init_transformer_weights)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor | None = None,
                num_kept: int | None = None, all_logits: bool = False) -> torch.Tensor:
        """Codebook logits at every position.

        ids:  (B, L) int64 token ids; values at masked positions are ignored.
        mask: (B, L) bool, True where the token is unreliable (replaced by the mask token).
        drop: optional (B, L) bool, positions removed from the encoder input (MAGE training;
              drop implies mask); every row drops the same number, `L - num_kept`.
        all_logits: return the logits of the whole vocabulary (B, L, V): codebook, class labels
              and mask token, as MAGE's training loss reads them (its label smoothing spreads
              over all V entries).
        returns (B, L, K) logits over the K codebook entries (only those are computed).
        """
        c = self.config
        B, L = ids.shape
        tokens = torch.where(mask, c.mask_id, ids)
        tokens = torch.cat([tokens.new_full((B, 1), c.fake_class_id), tokens], dim=1)  # (B, 1+L)
        x = self.token_emb(tokens)  # (B, 1+L, D)
        if drop is not None:
            keep_idx = _kept_positions(drop, num_kept)  # (B, 1+kept), class slot first
            x = x.gather(1, keep_idx[..., None].expand(-1, -1, x.shape[-1]))
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))  # (B, 1+kept, Dd)
        # Dropped and masked positions are filled with the class-slot feature (MAGE's padding).
        pad = x[:, :1].expand(B, L + 1, -1)
        if drop is not None:
            x = pad.scatter(1, keep_idx[..., None].expand(-1, -1, x.shape[-1]), x)
        slot_mask = torch.cat([mask.new_zeros(B, 1), mask], dim=1)
        x = torch.where(slot_mask[..., None], pad, x) + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            x = blk(x)
        # norm and head are per position: the class slot is left out
        return self.mlm_layer(self.decoder_norm(x[:, 1:]), self.token_emb.word_embeddings.weight,
                              vocab=None if all_logits else c.codebook_size)


def _kept_positions(drop: torch.Tensor, num_kept: int | None) -> torch.Tensor:
    """(B, L) drop mask -> (B, 1 + kept) sequence indices of kept slots, class slot (0) first."""
    if num_kept is None:
        num_kept = int((~drop[0]).sum())  # host sync; pass num_kept in hot loops
    order = torch.argsort(drop.to(torch.int8), dim=1, stable=True)[:, :num_kept] + 1
    return torch.cat([order.new_zeros(drop.shape[0], 1), order], dim=1)


@register_preset
def mage_vit_base_patch16() -> PredictorConfig:
    """MAGE ViT-B (mage-vitb-1600.pth)."""
    return PredictorConfig()


@register_preset
def mage_vit_large_patch16() -> PredictorConfig:
    """MAGE ViT-L (mage-vitl-1600.pth)."""
    return PredictorConfig(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=1024)


@register_preset
def mage_vit_small() -> PredictorConfig:
    """Tiny MAGE for 8x8 token grids and a 256-entry codebook (CPU demo; no dropout)."""
    return PredictorConfig(codebook_size=256, num_classes=1, seq_len=64, max_positions=65, embed_dim=64,
                 depth=4, num_heads=4, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, dropout=0.0)
