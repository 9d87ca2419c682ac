"""Triton kernel of the codebook weighted sum (definition: ``addp.ops.codebook_weighted_sum_reference``).

out = softmax(logits[..., :K] / T) @ codebook, and codebook[ids] where mask is False.

One program per (BLOCK_R rows, BLOCK_D columns): streamed over K in BLOCK_K chunks with an
online softmax -- running max m, running sum s, accumulator acc rescaled by exp(m_old - m_new)
-- and a tl.dot of the chunk's exp-weights with the codebook chunk (fp32 accumulation;
the weights are cast to the codebook's dtype for bf16/fp16 codebooks, fp32 codebooks use
the 3-pass tf32 dot, ~fp32 accurate). The B x L x K probabilities never exist. Reliable rows
skip the logits and gather codebook[ids]. (Under TRITON_INTERPRET=1 a bf16 codebook is
upcast to fp32 for the dot: the interpreter's bf16 tl.dot gives wrong results.)
``codebook_weighted_sum`` below is the op's CUDA kernel (registered by ``addp.ops.weighted_sum``).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

# The interpreter (TRITON_INTERPRET=1, numpy) computes bf16 tl.dot wrongly: upcast there.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _weighted_sum_kernel(x_ptr, sx0, sx1, sx2, cb_ptr, sck, scd, ids_ptr, mask_ptr, out_ptr,
                         N, L, K, D, inv_t, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_rows, in_d = rows < N, d < D
    soft = in_rows
    if HAS_MASK:
        unrel = tl.load(mask_ptr + rows, mask=in_rows, other=0).to(tl.int1)
        soft = in_rows & unrel
    x_row = x_ptr + (rows // L) * sx0 + (rows % L) * sx1
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        in_k = k < K
        x = tl.load(x_row[:, None] + k[None, :] * sx2, mask=soft[:, None] & in_k[None, :],
                    other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(x - m_safe[:, None])
        s = s * alpha + tl.sum(p, axis=1)
        c = tl.load(cb_ptr + k[:, None] * sck + d[None, :] * scd, mask=in_k[:, None] & in_d[None, :], other=0.0)
        if UPCAST:
            c = c.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=PRECISION)
        m = m_new
    out = acc / s[:, None]
    if HAS_MASK:
        ids = tl.load(ids_ptr + rows, mask=in_rows, other=0)
        hard = tl.load(cb_ptr + ids[:, None] * sck + d[None, :] * scd,
                       mask=(in_rows & ~unrel)[:, None] & in_d[None, :], other=0.0).to(tl.float32)
        out = tl.where(unrel[:, None], out, hard)
    tl.store(out_ptr + rows[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=in_rows[:, None] & in_d[None, :])


def codebook_weighted_sum(logits: torch.Tensor, codebook: torch.Tensor, ids: Optional[torch.Tensor],
                          mask: Optional[torch.Tensor], temperature: float) -> torch.Tensor:
    """The CUDA kernel of ``addp::codebook_weighted_sum`` (inputs checked by ``addp.ops``)."""
    lead = logits.shape[:-1]
    K, D = codebook.shape
    x = logits.reshape(1, 1, -1) if logits.dim() == 1 else logits.reshape(-1, *logits.shape[-2:])
    N, L = x.shape[0] * x.shape[1], x.shape[1]
    out = torch.empty((N, D), dtype=codebook.dtype, device=logits.device)
    if N:
        has_mask = mask is not None
        ids_c = ids.reshape(-1).contiguous() if has_mask else out
        mask_c = mask.reshape(-1).contiguous().view(torch.int8) if has_mask else out
        # Tiles that ptxas fits in registers without spills on sm_80 and sm_90 for every dtype
        # (benchmarks/results/triton_aot_resources.md): 32 logits per step, 32-row blocks for fp32
        # codebooks (their 3-pass tf32 dot needs more registers), 8 warps for the larger tiles.
        BLOCK_D = min(max(triton.next_power_of_2(D), 16), 128)
        BLOCK_K = min(max(triton.next_power_of_2(K), 16), 32)
        rows = 32 if codebook.dtype == torch.float32 else 64
        BLOCK_R = rows if N >= rows else 16
        grid = (triton.cdiv(N, BLOCK_R), triton.cdiv(D, BLOCK_D))
        _weighted_sum_kernel[grid](x, *x.stride(), codebook, *codebook.stride(), ids_c, mask_c, out,
                                   N, L, K, D, 1.0 / temperature, HAS_MASK=has_mask,
                                   PRECISION="tf32x3" if codebook.dtype == torch.float32 else "tf32",
                                   UPCAST=_INTERPRET and codebook.dtype == torch.bfloat16,
                                   BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D,
                                   num_warps=4 if BLOCK_R * BLOCK_D <= 1024 else 8)
    return out.reshape(*lead, D)
