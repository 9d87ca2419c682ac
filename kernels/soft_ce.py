"""Triton kernels of the fused soft-target cross entropy (definition:
``addp.ops.soft_target_cross_entropy_reference``), forward and backward.

Forward, one program per position, streamed over V in BLOCK_V chunks: an online logsumexp of
x and the sums of x and q * x, giving per position
    loss = -(1 - eps) (sum_k q_k x_k - lse sum_k q_k) - eps (mean_v x_v - lse)
(0 where mask is False), lse and sum_k q_k. The masked mean of the per-position losses is
two tiny torch reductions over (B, L). Backward, one program per position:
    dlogits = (exp(x - lse) ((1 - eps) sum q + eps) - (1 - eps) q - eps / V) * grad / max(#masked, 1)
with grad and #masked read from device memory (no host sync). The log-probabilities are
never stored. The two launchers below are the CUDA kernels of ``addp::soft_target_cross_entropy``
and ``addp::soft_target_cross_entropy_backward`` (registered by ``addp.ops.soft_ce``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _forward_kernel(x_ptr, sx0, sx1, sx2, q_ptr, sq0, sq1, sq2, mask_ptr, loss_ptr, lse_ptr, qsum_ptr,
                    L, V, K, eps, BLOCK_V: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b, l = r // L, r % L
    on = tl.load(mask_ptr + r).to(tl.int1)
    x_row, q_row = x_ptr + b * sx0 + l * sx1, q_ptr + b * sq0 + l * sq1
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per-lane running max and sums
    se = tl.zeros([BLOCK_V], tl.float32)
    sx = tl.zeros([BLOCK_V], tl.float32)
    sqx = tl.zeros([BLOCK_V], tl.float32)
    sq = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        in_v = (v < V) & on
        x = tl.load(x_row + v * sx2, mask=in_v, other=float("-inf")).to(tl.float32)
        q = tl.load(q_row + v * sq2, mask=in_v & (v < K), other=0.0).to(tl.float32)
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        se = se * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
        sx += tl.where(in_v, x, 0.0)
        sqx += tl.where(q != 0, q * x, 0.0)
        sq += q
    mx = tl.max(m, axis=0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    lse = mx_safe + tl.log(tl.sum(se * tl.exp(m - mx_safe), axis=0))
    qs = tl.sum(sq, axis=0)
    loss = -(1 - eps) * (tl.sum(sqx, axis=0) - lse * qs) - eps * (tl.sum(sx, axis=0) / V - lse)
    tl.store(loss_ptr + r, tl.where(on, loss, 0.0))
    tl.store(lse_ptr + r, tl.where(on, lse, 0.0))
    tl.store(qsum_ptr + r, tl.where(on, qs, 0.0))


@triton.jit
def _backward_kernel(grad_ptr, count_ptr, x_ptr, sx0, sx1, sx2, q_ptr, sq0, sq1, sq2, mask_ptr, lse_ptr,
                     qsum_ptr, out_ptr, L, V, K, eps, BLOCK_V: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b, l = r // L, r % L
    on = tl.load(mask_ptr + r).to(tl.int1)
    scale = tl.load(grad_ptr).to(tl.float32) / tl.maximum(tl.load(count_ptr), 1).to(tl.float32)
    scale = tl.where(on, scale, 0.0)
    lse = tl.load(lse_ptr + r)
    c = (1 - eps) * tl.load(qsum_ptr + r) + eps
    x_row, q_row = x_ptr + b * sx0 + l * sx1, q_ptr + b * sq0 + l * sq1
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        in_v = v < V
        x = tl.load(x_row + v * sx2, mask=in_v & on, other=0.0).to(tl.float32)
        q = tl.load(q_row + v * sq2, mask=in_v & on & (v < K), other=0.0).to(tl.float32)
        d = (tl.exp(x - lse) * c - (1 - eps) * q - eps / V) * scale
        tl.store(out_ptr + r * V + v, d.to(out_ptr.dtype.element_ty), mask=in_v)


def _block_v(V):
    return min(triton.next_power_of_2(V), 4096)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                              smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CUDA kernel of ``addp::soft_target_cross_entropy`` -> (loss, lse, qsum)."""
    B, L, V = logits.shape
    K = target.shape[-1]
    mask = mask.contiguous()
    row_loss = torch.empty((B, L), dtype=torch.float32, device=logits.device)
    lse, qsum = torch.empty_like(row_loss), torch.empty_like(row_loss)
    if B * L:
        _forward_kernel[(B * L,)](logits, *logits.stride(), target, *target.stride(), mask.view(torch.int8),
                                  row_loss, lse, qsum, L, V, K, float(smoothing), BLOCK_V=_block_v(V), num_warps=8)
    loss = row_loss.sum() / mask.sum().clamp_min(1)
    return loss, lse, qsum


def soft_target_cross_entropy_backward(grad: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                                       mask: torch.Tensor, lse: torch.Tensor, qsum: torch.Tensor,
                                       smoothing: float) -> torch.Tensor:
    """The CUDA kernel of ``addp::soft_target_cross_entropy_backward`` -> dlogits."""
    B, L, V = logits.shape
    mask = mask.contiguous()
    out = torch.empty((B, L, V), dtype=logits.dtype, device=logits.device)
    count = mask.sum()
    if B * L:
        _backward_kernel[(B * L,)](grad.reshape(()), count, logits, *logits.stride(), target, *target.stride(),
                                   mask.view(torch.int8), lse.contiguous(), qsum.contiguous(), out, L, V,
                                   target.shape[-1], float(smoothing), BLOCK_V=_block_v(V), num_warps=8)
    return out
