"""Gumbel top-k unmasking: one step of the sampler's candidate draw and confidence selection.

The op ``addp::gumbel_topk_unmask`` takes its uniform noise as inputs (the Python wrapper draws
it), so every backend gives the same result for the same generator state. CPU kernel
csrc/gumbel_topk.cpp, CUDA kernel kernels/gumbel_topk.py (Triton). The CUDA C++ kernel
csrc/cuda/gumbel_topk.cu is the op ``addp::gumbel_topk_unmask_cuda`` (same schema), run only
with ``backend="cuda"``: it has not yet been checked against the reference on a GPU.
"""
from __future__ import annotations

import torch

from ._dispatch import LIB, choose, register_triton
from .weighted_sum import FLOATS

OP = "gumbel_topk_unmask"
CUDA_OP = "gumbel_topk_unmask_cuda"
_SCHEMA = ("(Tensor logits, Tensor u1, Tensor u2, Tensor ids, Tensor mask, Tensor mask_len, float tau, "
           "Tensor? keep) -> (Tensor new_ids, Tensor new_mask)")
LIB.define(OP + _SCHEMA)
LIB.define(CUDA_OP + _SCHEMA)
register_triton(OP, "gumbel_topk", "gumbel_topk_unmask")


def _fake(logits, u1, u2, ids, mask, mask_len, tau, keep):
    B, L, _ = logits.shape
    return ids.new_empty((B, L)), mask.new_empty((B, L))


for _name in (OP, CUDA_OP):
    torch.library.register_fake(f"addp::{_name}", _fake, lib=LIB)


def lowest_k_mask_reference(confidence: torch.Tensor, mask_len) -> torch.Tensor:
    """(B, L) confidence -> (B, L) bool, True at the ``mask_len`` lowest values of each row.

    Tie rule (shared by every backend): positions are ordered by the key (confidence, index),
    so among equal confidences the lower index is chosen first; NaN sorts after +inf.
    ``mask_len`` is an int or a one-element int64 tensor (read on device: no host sync),
    effectively clamped to [0, L].
    """
    L = confidence.shape[-1]
    order = torch.sort(confidence, dim=-1, stable=True).indices
    positions = torch.arange(L, device=confidence.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    if isinstance(mask_len, torch.Tensor):
        mask_len = mask_len.reshape(())
    return rank < mask_len


def nucleus_keep(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """(..., K) logits -> (..., K) bool, True for tokens in the top-p nucleus: the smallest
    prefix of the probabilities sorted in descending order whose sum reaches ``top_p``
    (the most likely token is always in it)."""
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    keep_sorted = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from uniforms u in [0, 1): -log(-log(u)), u clamped below at the
    smallest normal number of its dtype (finite: a zero scale times it is 0, never NaN)."""
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))


def gumbel_topk_unmask_reference(logits, u1, u2, ids, mask, mask_len, tau, keep=None):
    """Definition of one unmasking step given its uniform noise (see ``gumbel_topk_unmask``).

    logits (B, L, K) float; u1 (B, L, K) float32 and u2 (B, L) float64 uniforms in [0, 1);
    ids (B, L) int64; mask (B, L) bool (True = unreliable); mask_len int or int64 tensor;
    keep (B, L, K) bool or None (False = excluded from sampling, e.g. outside the nucleus).
    Returns (new_ids (B, L) int64, new_mask (B, L) bool).
    """
    scores = logits.float()
    sample_scores = scores if keep is None else scores.masked_fill(~keep, float("-inf"))
    sampled = torch.argmax(sample_scores + gumbel(u1), dim=-1)
    new_ids = torch.where(mask, sampled, ids)
    # log of the sampled probability (not log_softmax): the sampler's (official) rounding
    prob = torch.softmax(scores, dim=-1).gather(-1, new_ids.unsqueeze(-1)).squeeze(-1)
    confidence = torch.log(prob) + (tau * gumbel(u2)).float()
    confidence = confidence.masked_fill(~mask, float("inf"))
    return new_ids, lowest_k_mask_reference(confidence, mask_len)


def check_inputs(logits, ids, mask, top_p) -> None:
    """Raise a one-line ValueError naming what is wrong with the inputs."""
    if logits.dim() != 3 or logits.dtype not in FLOATS:
        raise ValueError(f"gumbel_topk_unmask: logits must be (B, L, K) float32/bfloat16/float16, "
                         f"got {logits.dtype} {tuple(logits.shape)}")
    lead = tuple(logits.shape[:2])
    if tuple(ids.shape) != lead or tuple(mask.shape) != lead:
        raise ValueError(f"gumbel_topk_unmask: ids {tuple(ids.shape)} and mask {tuple(mask.shape)} must be (B, L) "
                         f"= {lead}")
    if ids.dtype != torch.int64 or mask.dtype != torch.bool:
        raise ValueError(f"gumbel_topk_unmask: ids must be int64 and mask bool, got {ids.dtype} and {mask.dtype}")
    if not 0 < top_p <= 1:
        raise ValueError(f"gumbel_topk_unmask: top_p must be in (0, 1], got {top_p}")


def _uniform(shape, dtype, generator, device) -> torch.Tensor:
    """torch.rand(shape) from ``generator``, drawn on the generator's device and moved to
    ``device``; a list of generators draws row b from generator b."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([_uniform((1, *shape[1:]), dtype, g, device) for g in generator])
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, dtype=dtype, device=source).to(device)


def gumbel_topk_unmask(logits, ids, mask, mask_len, tau: float, generator=None, top_p: float = 1.0, backend=None):
    """One unmasking step of the sampler: sample candidate ids, keep the confident ones.

    At every position a candidate is drawn from ``softmax(logits)`` by Gumbel-max (only from
    the top-p nucleus when ``top_p < 1``); ``new_ids = where(mask, sampled, ids)``. The
    confidence is ``log p(new_id) + tau * Gumbel`` (+inf at reliable positions) and
    ``new_mask`` is True at the ``mask_len`` lowest-confidence positions of each row, ties
    to the lower index (``lowest_k_mask_reference``).

    Random numbers: this wrapper draws ``u1 = torch.rand((B, L, K), float32)`` then
    ``u2 = torch.rand((B, L), float64)`` from ``generator`` (on the generator's device, then
    moved to the logits') and passes them to the kernel, so every backend gives the same
    result for the same generator state (up to float rounding of near-ties). With a list of
    B generators, row b's u1 and u2 come from generator b.

    Args:
        logits: (B, L, K) float32/bfloat16/float16, any strides (e.g. a slice ``[..., :K]``).
        ids: (B, L) int64 current ids; mask: (B, L) bool, True = unreliable.
        mask_len: int, or a one-element int64 tensor on the logits' device (read on device,
            so a captured CUDA graph can replay with a new value); clamped to [0, L].
        tau: Gumbel scale of the confidence (float >= 0).
        generator: a torch.Generator (any device), a list of B of them (one per row), or
            None for the global RNG of the logits' device.
        top_p: nucleus sampling when < 1 (the nucleus is computed with torch.sort).
        backend: "reference" | "cpu" | "triton" | "cuda" | "auto"; None reads ADDP_OPS_BACKEND.
            Auto never picks "cuda" (the CUDA C++ kernel).

    Returns:
        (new_ids (B, L) int64, new_mask (B, L) bool).
    """
    check_inputs(logits, ids, mask, top_p)
    B, L, K = logits.shape
    if isinstance(generator, (list, tuple)) and len(generator) != B:
        raise ValueError(f"gumbel_topk_unmask: {len(generator)} generators for {B} rows")
    u1 = _uniform((B, L, K), torch.float32, generator, logits.device)
    u2 = _uniform((B, L), torch.float64, generator, logits.device)
    keep = nucleus_keep(logits, top_p) if top_p < 1 else None
    if isinstance(mask_len, torch.Tensor):
        mask_len = mask_len.to(device=logits.device, dtype=torch.int64).reshape(())
    else:
        mask_len = torch.full((), int(mask_len), dtype=torch.int64, device=logits.device)
    args = (logits, u1, u2, ids, mask, mask_len, float(tau), keep)
    name = choose(OP, backend, logits.device, cuda_op=CUDA_OP)
    if name == "reference":
        return gumbel_topk_unmask_reference(*args)
    if name == "cuda":
        return torch.ops.addp.gumbel_topk_unmask_cuda(*args)
    return torch.ops.addp.gumbel_topk_unmask(*args)
