"""The ADDP training loss: cross entropy against the token predictor's soft target.

With label smoothing eps over the V vocabulary columns (the official
`nn.CrossEntropyLoss(label_smoothing=0.1)` with a probability target padded with zeros
beyond the codebook), at each position:
    loss = -(1 - eps) * sum_k q_k log p_k  -  eps * mean_v log p_v
averaged over the unreliable positions (mask_t). The hard target z0 replaces q by a one-hot.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops

TARGETS = ("soft", "hard", "both")


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                              smoothing: float = 0.1) -> torch.Tensor:
    """logits (B, L, V), target (B, L, K<=V) probabilities, mask (B, L) bool -> scalar.

    The fused op (log-softmax, loss and masked mean in one pass, forward and backward);
    its plain-PyTorch definition is ``ops.soft_target_cross_entropy_reference``.
    """
    return ops.soft_target_cross_entropy(logits, target, mask, smoothing)


def hard_target_cross_entropy(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                              smoothing: float = 0.1) -> torch.Tensor:
    """logits (B, L, V), ids (B, L) int64, mask (B, L) bool -> scalar."""
    per_pos = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="none",
                              label_smoothing=smoothing).view(ids.shape)
    return _masked_mean(per_pos, mask)


def addp_loss(logits, ids, mask, target=None, kind: str = "soft", smoothing: float = 0.1) -> torch.Tensor:
    """ADDP loss of logits (B, L, V) at mask (B, L): against the soft target (B, L, K),
    the clean ids z0 (B, L) ("hard"), or the sum of both ("both")."""
    if kind not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {kind!r}")
    loss = logits.new_zeros((), dtype=torch.float32)
    if kind in ("soft", "both"):
        loss = loss + soft_target_cross_entropy(logits, target, mask, smoothing)
    if kind in ("hard", "both"):
        loss = loss + hard_target_cross_entropy(logits, ids, mask, smoothing)
    return loss


def _masked_mean(per_pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(per_pos.dtype)
    return (per_pos * m).sum() / m.sum().clamp_min(1)
