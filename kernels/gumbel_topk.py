"""Triton kernels of Gumbel top-k unmasking (definition: ``addp.ops.gumbel_topk_unmask_reference``).

Two launches, no host synchronisation:

1. ``_sample_kernel``, BLOCK_R positions per program, streamed over K in BLOCK_K chunks:
   Gumbel-max over ``logits + G(u1)`` (first index of the maximum, like torch.argmax), an
   online logsumexp of the logits, then ``conf = log p(sampled) + float(tau * G64(u2))``
   (+inf where the position is reliable; reliable rows load nothing).
2. ``_select_kernel``, one program per batch row: the rank of each confidence under the key
   (conf, index) by counting the smaller keys (O(L^2), chunked; L <= a few thousand), and
   ``new_mask = rank < mask_len`` with mask_len read from device memory -- so a captured
   CUDA graph can replay every step with a new mask_len. Ties go to the lower index, as in
   the reference (NaN confidences, from all -inf logits rows, are not ordered).

``gumbel_topk_unmask`` below is the op's CUDA kernel (registered by ``addp.ops.gumbel_topk``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# constexpr globals: a jitted kernel may read no other globals (the interpreter does not check this)
TINY32 = tl.constexpr(1.1754943508222875e-38)   # torch.finfo(torch.float32).tiny
TINY64 = tl.constexpr(2.2250738585072014e-308)  # torch.finfo(torch.float64).tiny


@triton.jit
def _sample_kernel(x_ptr, sx0, sx1, sx2, u1_ptr, u2_ptr, ids_ptr, mask_ptr, keep_ptr,
                   new_ids_ptr, conf_ptr, N, L, K, tau_ptr,
                   HAS_KEEP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = rows < N
    unrel = tl.load(mask_ptr + rows, mask=in_rows, other=0).to(tl.int1)
    active = in_rows & unrel
    x_row = x_ptr + (rows // L) * sx0 + (rows % L) * sx1
    best = tl.full([BLOCK_R], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_R], tl.int64)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ld = active[:, None] & (cols < K)[None, :]
        x = tl.load(x_row[:, None] + cols[None, :] * sx2, mask=ld, other=float("-inf")).to(tl.float32)
        u = tl.load(u1_ptr + rows[:, None] * K + cols[None, :], mask=ld, other=0.5)
        g = -tl.log(-tl.log(tl.maximum(u, TINY32)))
        score = x + g
        if HAS_KEEP:
            kp = tl.load(keep_ptr + rows[:, None] * K + cols[None, :], mask=ld, other=0).to(tl.int1)
            score = tl.where(kp, score, float("-inf"))
        score = tl.where(ld, score, float("-inf"))
        bmax = tl.max(score, axis=1)
        barg = tl.argmax(score, axis=1).to(tl.int64) + k0
        upd = bmax > best
        best = tl.where(upd, bmax, best)
        arg = tl.where(upd, barg, arg)
        # online logsumexp of x (guarded against -inf - -inf)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
    old = tl.load(ids_ptr + rows, mask=in_rows, other=0)
    new_id = tl.where(unrel, arg, old)
    x_s = tl.load(x_row + new_id * sx2, mask=active, other=0.0).to(tl.float32)
    logp = tl.log(tl.exp(x_s - m) / s)
    u2 = tl.load(u2_ptr + rows, mask=active, other=0.5)
    tau = tl.load(tau_ptr)  # float64: a scalar argument would be rounded to float32
    choice = (tau * -tl.log(-tl.log(tl.maximum(u2, TINY64)))).to(tl.float32)
    conf = tl.where(unrel, logp + choice, float("inf"))
    tl.store(new_ids_ptr + rows, new_id, mask=in_rows)
    tl.store(conf_ptr + rows, conf, mask=in_rows)


@triton.jit
def _select_kernel(conf_ptr, mask_len_ptr, out_ptr, L,
                   BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_L)
    ci = tl.load(conf_ptr + b * L + i, mask=i < L, other=float("inf"))
    rank = tl.zeros([BLOCK_L], tl.int32)
    for j0 in range(0, L, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        cj = tl.load(conf_ptr + b * L + j, mask=j < L, other=float("inf"))
        before = (cj[None, :] < ci[:, None]) | ((cj[None, :] == ci[:, None]) & (j[None, :] < i[:, None]))
        before = before & (j < L)[None, :]
        rank += tl.sum(before.to(tl.int32), axis=1)
    n = tl.load(mask_len_ptr)
    tl.store(out_ptr + b * L + i, (rank < n).to(tl.int8), mask=i < L)


def gumbel_topk_unmask(logits: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor, ids: torch.Tensor,
                       mask: torch.Tensor, mask_len: torch.Tensor, tau: float,
                       keep: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA kernel of ``addp::gumbel_topk_unmask`` (inputs checked by ``addp.ops``)."""
    B, L, K = logits.shape
    u1, u2, ids, mask = u1.contiguous(), u2.contiguous(), ids.contiguous(), mask.contiguous()
    keep = keep.contiguous() if keep is not None else None
    new_ids = torch.empty((B, L), dtype=torch.int64, device=logits.device)
    new_mask = torch.empty((B, L), dtype=torch.bool, device=logits.device)
    conf = torch.empty((B, L), dtype=torch.float32, device=logits.device)
    N = B * L
    if N == 0:
        return new_ids, new_mask
    BLOCK_K = min(triton.next_power_of_2(K), 1024)
    BLOCK_R = max(1, min(16, 4096 // BLOCK_K))
    _sample_kernel[(triton.cdiv(N, BLOCK_R),)](
        logits, *logits.stride(), u1, u2, ids, mask.view(torch.int8), (keep if keep is not None else mask).view(torch.int8),
        new_ids, conf, N, L, K, torch.full((1,), tau, dtype=torch.float64, device=logits.device),
        HAS_KEEP=keep is not None, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, num_warps=4)
    BLOCK_L = triton.next_power_of_2(L)
    BLOCK_J = max(1, min(64, 16384 // BLOCK_L))
    _select_kernel[(B,)](conf, mask_len.reshape(()).to(torch.int64), new_mask.view(torch.int8), L,
                         BLOCK_L=BLOCK_L, BLOCK_J=BLOCK_J, num_warps=8 if BLOCK_L >= 512 else 4)
    return new_ids, new_mask
