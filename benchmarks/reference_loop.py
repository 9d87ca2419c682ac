"""The side-by-side baseline: ADDP generation and training written the way the official code
runs them (ChangyaoTian/ADDP at 7c2c034: engine_generate.py, engine_pretrain.py,
modeling/encoders/models_addp.py), on our modules and weights.

What makes it the official loop, kept on purpose:
  * attention in fp32 with the N x N matrix materialised (``attention_backend("math")``);
  * torch's dropout (``dropout_backend("torch")``);
  * the full B x L x K probability tensor materialised, sampled with
    ``torch.distributions.Categorical``, gathered, and multiplied by the codebook;
  * Gumbel noise for the choice of positions drawn with NumPy on the host and copied over;
  * the number of reliable tokens read back from the device (boolean indexing in the
    official decoder), ``loss.item()`` and a device synchronisation every step;
  * the decoder's norm and MLM head run on every slot of its sequence (class slot, image
    slots and the appended reliable tokens), the logits sliced afterwards;
  * the token predictor run twice per training step (input condition t+1, target t);
  * the loss through ``nn.CrossEntropyLoss`` on a zero-padded probability target;
  * default (non-fused) AdamW;
  * the VQGAN encoder and decoder in contiguous NCHW, the nearest-upsampled tensor built
    before each upsampling conv (``vq_decode`` / ``vq_encode`` below: the layers of MAGE's
    taming model, walked with torch.nn.functional on our tokenizer's weights).
The arithmetic is the same as ours (same schedule, same weights), so speed is the only
thing compared. Nothing here is imported by the package.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from addp.training.diffusion import DiffusionConfig, MaskSchedule
from addp.models.layers import attention_backend, dropout_backend


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# --------------------------------------------------------------------------- VQGAN passes
def _group_norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return F.silu(F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps))


def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias, padding=conv.padding)


def _res_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = _conv(block.conv2, _group_norm_silu(block.norm2, _conv(block.conv1, _group_norm_silu(block.norm1, x))))
    return (x if block.nin_shortcut is None else _conv(block.nin_shortcut, h)) + h


def vq_decode_grid(decoder: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The VQGAN decoder on (B, D, h, w) latents, contiguous NCHW throughout."""
    h = _conv(decoder.conv_in, z.contiguous())
    h = _res_block(decoder.mid.block_2, _res_block(decoder.mid.block_1, h))
    for up in reversed(decoder.up):
        for block in up.block:
            h = _res_block(block, h)
        if hasattr(up, "upsample"):
            h = _conv(up.upsample.conv, F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return _conv(decoder.conv_out, _group_norm_silu(decoder.norm_out, h))


def vq_encode_latents(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The VQGAN encoder on (B, 3, H, W) images, contiguous NCHW throughout."""
    h = _conv(encoder.conv_in, images.contiguous())
    for level, down in enumerate(encoder.down):
        for block in down.block:
            h = _res_block(block, h)
        if level != len(encoder.down) - 1:
            h = F.avg_pool2d(h, 2)
    h = _res_block(encoder.mid.block_2, _res_block(encoder.mid.block_1, h))
    return _conv(encoder.conv_out, _group_norm_silu(encoder.norm_out, h))


def vq_decode(tokenizer: nn.Module, emb: torch.Tensor) -> torch.Tensor:
    """(B, L, D) token embeddings -> images (B, 3, H, W), square token grid."""
    B, L, D = emb.shape
    side = math.isqrt(L)
    return vq_decode_grid(tokenizer.decoder, emb.transpose(1, 2).reshape(B, D, side, side))


def vq_encode(tokenizer: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images -> ids (B, L): nearest codebook vectors of the encoder's latents."""
    z = vq_encode_latents(tokenizer.encoder, images)
    B, D, h, w = z.shape
    return tokenizer.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, D)).reshape(B, h * w)


def _forward(net: nn.Module, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """models_addp.forward_decoder: the number of reliable tokens read back from the device,
    norm + MLM head over the whole decoder sequence, then the image slots kept."""
    num_reliable = int((~mask[0]).sum())
    x = net.decoder_blocks_output(net.forward_encoder(images), ids, mask, num_reliable)
    logits = net.mlm_layer(net.decoder_norm(x), net.token_emb.weight)
    return logits[:, 1: 1 + mask.shape[1]]


# --------------------------------------------------------------------------- generation
def _choose_masked(mask_len: int, sampled_probs: torch.Tensor, temperature: float,
                   rng: np.random.RandomState) -> torch.Tensor:
    """engine_generate.mask_by_random_topk: the mask_len lowest log p + tau * Gumbel."""
    noise = torch.Tensor(temperature * rng.gumbel(size=tuple(sampled_probs.shape))).to(sampled_probs.device)
    confidence = torch.log(sampled_probs) + noise
    idx = torch.topk(confidence, k=mask_len, dim=-1, largest=False).indices
    masks = torch.zeros_like(sampled_probs, dtype=torch.bool)
    rows = torch.arange(masks.shape[0], device=masks.device).unsqueeze(-1)
    masks[rows, idx] = True
    return masks


@torch.no_grad()
def generate(net: nn.Module, tokenizer: nn.Module, batch_size: int, steps: int = 20, temperature: float = 6.0,
             schedule: str = "cosine", seed: int = 0, amp_dtype=None) -> torch.Tensor:
    """One batch of images, the official multi-step loop (its parity behaviour: the last step
    keeps one soft position). Returns (B, 3, H, W) in [0, 1]."""
    net.eval(), tokenizer.eval()
    device = next(net.parameters()).device
    rng = np.random.RandomState(seed)
    torch.manual_seed(seed)
    L, K, size = net.config.num_patches, net.config.codebook_size, net.config.image_size
    codebook = tokenizer.codebook
    x = torch.zeros(batch_size, 3, size, size, device=device)
    ids = torch.zeros(batch_size, L, dtype=torch.long, device=device)
    masks = torch.ones(batch_size, L, device=device)  # float, as the official masks
    with attention_backend("math"):
        for step in range(steps):
            with _autocast(device, amp_dtype):
                logits = _forward(net, x, ids, masks.bool())[..., :K].float()
            sampled = torch.distributions.Categorical(logits=logits).sample()
            ids_next = torch.where(masks.bool(), sampled, ids)
            probs = F.softmax(logits, dim=-1)
            sampled_probs = torch.gather(probs, -1, ids_next.unsqueeze(-1)).squeeze(-1)
            sampled_probs = torch.where(masks.bool(), sampled_probs.double(), np.inf).float()
            ratio = 1.0 * (step + 1) / steps
            mask_ratio = math.cos(math.pi / 2.0 * ratio) if schedule == "cosine" else 1.0 - ratio
            mask_len = int(np.clip(math.ceil(L * mask_ratio), 1, L))
            masks_next = _choose_masked(mask_len, sampled_probs, temperature * (1 - ratio), rng)
            soft = F.softmax(logits, dim=-1) @ codebook
            hard = codebook[ids_next]
            with _autocast(device, amp_dtype):
                x = vq_decode(tokenizer, torch.where(masks_next.unsqueeze(-1), soft, hard)).float()
            ids, masks = ids_next, masks_next.float()
            _sync(device)
    return x.clamp(0, 1)


# --------------------------------------------------------------------------- training
def _random_masking(schedule: MaskSchedule, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """models_addp.random_masking: grid index from the truncated normal, next index + U{1..5},
    masks from a sorted noise cutoff, redrawn until the counts are exact (a sync)."""
    i = int(torch.multinomial(schedule.probs, 1))
    j = min(i + random.randint(1, schedule.config.max_offset), len(schedule.ratios) - 1)
    n_t, n_next = schedule.count(i), schedule.count(j)
    while True:
        noise = torch.rand(batch, schedule.seq_len, device=device)
        sorted_noise, _ = torch.sort(noise, dim=1)
        mask_t = (noise <= sorted_noise[:, n_t - 1:n_t]).float()
        mask_next = (noise <= sorted_noise[:, n_next - 1:n_next]).float()
        if mask_t.sum() == batch * n_t and mask_next.sum() == batch * n_next:
            return mask_t, mask_next


class TrainStep:
    """One official-style ADDP training step on ``images``; ``__call__`` returns the loss."""

    def __init__(self, net, tokenizer, predictor, lr: float = 1e-4, amp_dtype=None, clip_grad: float | None = 3.0):
        self.net, self.tokenizer, self.predictor = net.train(), tokenizer.eval(), predictor.eval()
        for p in (*tokenizer.parameters(), *predictor.parameters()):
            p.requires_grad_(False)
        self.schedule = MaskSchedule(DiffusionConfig(), predictor.config.seq_len)
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
        self.criterion = nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1)
        self.amp_dtype, self.clip_grad = amp_dtype, clip_grad

    def __call__(self, images: torch.Tensor) -> float:
        device = images.device
        codebook = self.tokenizer.codebook
        # as engine_pretrain: the whole forward, frozen passes included, under autocast
        with torch.no_grad(), attention_backend("math"), dropout_backend("torch"), _autocast(device, self.amp_dtype):
            z0 = vq_encode(self.tokenizer, images)
            mask_t, mask_next = _random_masking(self.schedule, images.shape[0], device)
            p_in = F.softmax(self.predictor(z0, mask_next.bool()).float(), dim=-1)  # the predictor, twice
            target = F.softmax(self.predictor(z0, mask_t.bool()).float(), dim=-1)
            soft = torch.einsum("bln,nd->bld", p_in, codebook)
            z_t = torch.where(mask_t.bool().unsqueeze(-1), soft, codebook[z0])
            x_t = vq_decode(self.tokenizer, z_t).float()
        with attention_backend("math"), dropout_backend("torch"), _autocast(device, self.amp_dtype):
            logits = _forward(self.net, x_t, z0, mask_t.bool())  # (B, L, V)
        V = logits.shape[-1]
        padded = torch.cat([target, target.new_zeros(*target.shape[:2], V - target.shape[-1])], dim=-1)
        loss = self.criterion(logits.float().permute(0, 2, 1), padded.permute(0, 2, 1))  # (B, L)
        loss = (loss * mask_t).sum() / mask_t.sum()
        loss_value = loss.item()
        self.optimizer.zero_grad()
        loss.backward()
        if self.clip_grad:
            nn.utils.clip_grad_norm_(self.net.parameters(), self.clip_grad)
        self.optimizer.step()
        _sync(device)
        return loss_value

