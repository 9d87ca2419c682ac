"""Codebook weighted sum: ``softmax(logits[..., :K] / T) @ codebook``, ``codebook[ids]`` where reliable.

The op ``addp::codebook_weighted_sum``: CPU kernel csrc/weighted_sum.cpp, CUDA kernel
kernels/weighted_sum.py (Triton). Both stream over K with an online softmax and never hold the
B x L x K probabilities. Neither has a backward: calls that need gradients run the reference.
"""
from __future__ import annotations

import torch

from ._dispatch import LIB, choose, register_triton

OP = "codebook_weighted_sum"
LIB.define(f"{OP}(Tensor logits, Tensor codebook, Tensor? ids, Tensor? mask, float temperature) -> Tensor")
register_triton(OP, "weighted_sum", "codebook_weighted_sum")

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.register_fake(f"addp::{OP}", lib=LIB)
def _fake(logits, codebook, ids, mask, temperature):
    return logits.new_empty((*logits.shape[:-1], codebook.shape[1]), dtype=codebook.dtype)


def codebook_weighted_sum_reference(logits, codebook, ids=None, mask=None, temperature=1.0):
    """Definition of the codebook weighted sum in plain PyTorch (see `codebook_weighted_sum`)."""
    K = codebook.shape[0]
    probs = torch.softmax(logits[..., :K].float() / temperature, dim=-1)
    out = probs @ codebook.float()
    if mask is not None:  # True = unreliable -> soft embedding; False = reliable -> codebook[ids]
        out = torch.where(mask.unsqueeze(-1), out, codebook.float()[ids])
    return out.to(codebook.dtype)


def check_inputs(logits, codebook, ids, mask, temperature) -> None:
    """Raise a one-line ValueError naming what is wrong with the inputs."""
    def bad(msg):
        raise ValueError(f"codebook_weighted_sum: {msg}")

    if codebook.dim() != 2:
        bad(f"codebook must be 2-D (K, D), got shape {tuple(codebook.shape)}")
    if logits.dim() < 1 or logits.dtype not in FLOATS or codebook.dtype not in FLOATS:
        bad(f"logits (..., V) and codebook must be float32/bfloat16/float16, got {logits.dtype} and {codebook.dtype}")
    if codebook.shape[0] > logits.shape[-1]:
        bad(f"codebook size K = {codebook.shape[0]} exceeds the logits' last dim V = {logits.shape[-1]}")
    if (ids is None) != (mask is None):
        bad("ids and mask must be given together")
    if ids is not None:
        lead = tuple(logits.shape[:-1])
        if tuple(ids.shape) != lead or tuple(mask.shape) != lead:
            bad(f"ids {tuple(ids.shape)} and mask {tuple(mask.shape)} must have the shape logits.shape[:-1] = {lead}")
        if ids.dtype != torch.int64 or mask.dtype != torch.bool:
            bad(f"ids must be int64 and mask bool, got {ids.dtype} and {mask.dtype}")
    if not temperature > 0:
        bad(f"temperature must be > 0, got {temperature}")


def codebook_weighted_sum(logits, codebook, ids=None, mask=None, temperature=1.0, backend=None):
    """Map token logits to codebook embeddings: ``softmax(logits[..., :K] / T) @ codebook``.

    Where ``mask`` is False (a reliable position) the output is the hard embedding
    ``codebook[ids]`` instead. Accumulation is in float32.

    Args:
        logits: (..., V) float32/bfloat16/float16 with V >= K; only the first K columns
            (the codebook entries) are used. May be a non-contiguous view.
        codebook: (K, D) float32/bfloat16/float16 embeddings.
        ids: (...) int64 token ids in [0, K) at every position (as the reference indexes
            them all), or None. Given together with ``mask``.
        mask: (...) bool; True = unreliable (soft embedding), False = reliable (codebook[ids]).
        temperature: float > 0, divides the logits before the softmax.
        backend: "reference" | "cpu" | "triton" | "auto"; None reads the env var
            ADDP_OPS_BACKEND (default auto). Auto uses the reference whenever autograd needs
            gradients of the inputs.

    Returns:
        (..., D) tensor in ``codebook.dtype``, contiguous.
    """
    check_inputs(logits, codebook, ids, mask, temperature)
    needs_grad = torch.is_grad_enabled() and (logits.requires_grad or codebook.requires_grad)
    if choose(OP, backend, logits.device, needs_grad) == "reference":
        return codebook_weighted_sum_reference(logits, codebook, ids, mask, temperature)
    return torch.ops.addp.codebook_weighted_sum(logits, codebook, ids, mask, float(temperature))
