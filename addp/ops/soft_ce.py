"""Soft-target cross entropy with label smoothing, fused with the log-softmax and the masked mean.

Two ops: ``addp::soft_target_cross_entropy`` -> (loss, lse, qsum) with, per position, the
logsumexp of the logits and the sum of the target, and its backward
``addp::soft_target_cross_entropy_backward`` -> dlogits, tied together by
``torch.library.register_autograd``. CPU kernels csrc/soft_ce.cpp, CUDA kernels
kernels/soft_ce.py (Triton). The log-probabilities are never stored.
"""
from __future__ import annotations

import torch

from ._dispatch import LIB, choose, register_triton

OP = "soft_target_cross_entropy"
BACKWARD_OP = "soft_target_cross_entropy_backward"
LIB.define(f"{OP}(Tensor logits, Tensor target, Tensor mask, float smoothing) "
           "-> (Tensor loss, Tensor lse, Tensor qsum)")
LIB.define(f"{BACKWARD_OP}(Tensor grad, Tensor logits, Tensor target, Tensor mask, Tensor lse, Tensor qsum, "
           "float smoothing) -> Tensor")
register_triton(OP, "soft_ce", "soft_target_cross_entropy")
register_triton(BACKWARD_OP, "soft_ce", "soft_target_cross_entropy_backward")


def _accumulation_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.register_fake(f"addp::{OP}", lib=LIB)
def _fake(logits, target, mask, smoothing):
    stats = logits.new_empty(logits.shape[:2], dtype=_accumulation_dtype(logits))
    return logits.new_empty((), dtype=stats.dtype), stats, torch.empty_like(stats)


@torch.library.register_fake(f"addp::{BACKWARD_OP}", lib=LIB)
def _backward_fake(grad, logits, target, mask, lse, qsum, smoothing):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, target, mask, smoothing = inputs
    _, lse, qsum = output
    ctx.mark_non_differentiable(lse, qsum)
    ctx.save_for_backward(logits, target, mask, lse, qsum)
    ctx.smoothing = smoothing


def _backward(ctx, grad, _grad_lse, _grad_qsum):
    logits, target, mask, lse, qsum = ctx.saved_tensors
    dlogits = torch.ops.addp.soft_target_cross_entropy_backward(grad, logits, target, mask, lse, qsum, ctx.smoothing)
    return dlogits, None, None, None


torch.library.register_autograd(f"addp::{OP}", _backward, setup_context=_setup_context, lib=LIB)


def soft_target_cross_entropy_reference(logits, target, mask, smoothing=0.1):
    """Definition (``addp.training.loss.soft_target_cross_entropy``): logits (B, L, V), target (B, L, K<=V)
    probabilities, mask (B, L) bool -> scalar

        mean over mask of  -(1 - eps) sum_k q_k log p_k - eps mean_v log p_v,  p = softmax(logits)

    computed in float32 (float64 for float64 logits, for gradcheck)."""
    acc = _accumulation_dtype(logits)
    logp = torch.log_softmax(logits.to(acc), dim=-1)
    K = target.shape[-1]
    per_pos = -(1 - smoothing) * (target.to(acc) * logp[..., :K]).sum(-1) - smoothing * logp.mean(-1)
    m = mask.to(acc)
    return (per_pos * m).sum() / m.sum().clamp_min(1)


def check_inputs(logits, target, mask, smoothing) -> None:
    """Raise a one-line ValueError naming what is wrong with the inputs."""
    if logits.dim() != 3 or target.dim() != 3 or tuple(mask.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"soft_target_cross_entropy: need logits (B, L, V), target (B, L, K) and mask (B, L), got "
                         f"{tuple(logits.shape)}, {tuple(target.shape)}, {tuple(mask.shape)}")
    if target.shape[:2] != logits.shape[:2] or target.shape[-1] > logits.shape[-1]:
        raise ValueError(f"soft_target_cross_entropy: target {tuple(target.shape)} must be (B, L, K <= V) "
                         f"for logits {tuple(logits.shape)}")
    if not (logits.is_floating_point() and target.is_floating_point()):
        raise ValueError(f"soft_target_cross_entropy: logits and target must be floating point, got "
                         f"{logits.dtype} and {target.dtype}")
    if mask.dtype != torch.bool:
        raise ValueError(f"soft_target_cross_entropy: mask must be bool, got {mask.dtype}")
    if not 0 <= smoothing <= 1:
        raise ValueError(f"soft_target_cross_entropy: smoothing must be in [0, 1], got {smoothing}")


def soft_target_cross_entropy(logits, target, mask, smoothing: float = 0.1, backend=None):
    """Soft-target cross entropy with label smoothing, fused with the log-softmax and the masked mean.

    Args:
        logits: (B, L, V) float32/bfloat16/float16 (float64 on the cpu/reference backends), any strides.
        target: (B, L, K <= V) probabilities (zero-padded to V by the definition).
        mask: (B, L) bool; the loss is the mean over the True positions (0 when none).
        smoothing: label smoothing eps in [0, 1].
        backend: "reference" | "cpu" | "triton" | "auto"; None reads ADDP_OPS_BACKEND. The fused
            backends are differentiable w.r.t. logits (dlogits computed in one pass, never
            storing the log-probabilities); auto uses the reference when target needs a gradient.

    Returns:
        0-d float32 tensor (float64 for float64 logits).
    """
    check_inputs(logits, target, mask, smoothing)
    needs_grad = torch.is_grad_enabled() and target.requires_grad
    if choose(OP, backend, logits.device, needs_grad) == "reference":
        return soft_target_cross_entropy_reference(logits, target, mask, smoothing)
    return torch.ops.addp.soft_target_cross_entropy(logits, target, mask, float(smoothing))[0]
