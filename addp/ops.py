"""Fused ops and the one place that picks their backend.

Each op has a plain-PyTorch reference (its definition, used by tests) and faster backends:

    reference  plain PyTorch, any device, differentiable
    cpu        C++ kernel of the compiled extension ``addp._C`` (CPU tensors)
    triton     Triton kernel in ``addp.kernels`` (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
    cuda       CUDA C++ kernel of ``addp._C`` (CUDA tensors; gumbel_topk_unmask only, when built)

The ops: ``codebook_weighted_sum``, ``gumbel_topk_unmask`` and ``soft_target_cross_entropy``.

The backend comes from the ``backend=`` argument, else the env var ``ADDP_OPS_BACKEND``,
else "auto": the fastest one available for the inputs' device, falling back to the
reference. An explicitly requested backend that cannot run raises a one-line RuntimeError.

Compiled ops are ``torch.library`` custom ops (schemas in csrc/ops.cpp, fake implementations
below), so ``torch.compile`` sees one opaque op with static output shapes.
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

BACKENDS = ("reference", "cpu", "triton", "cuda")
BACKEND_ENV = "ADDP_OPS_BACKEND"

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.addp.*)

    _C_ERROR: Optional[BaseException] = None
except (ImportError, OSError) as exc:  # not built, or built against another torch
    _C_ERROR = exc
    log.debug("addp._C not loaded (%s); fused ops use the plain-PyTorch reference", exc)


def has_compiled_ops() -> bool:
    """True when the compiled extension ``addp._C`` loaded (its ops are in ``torch.ops.addp``)."""
    return _C_ERROR is None


# --------------------------------------------------------------------------- backend table
@dataclass(frozen=True)
class _Impl:
    fn: Callable
    # Why this backend cannot run on these inputs (a short phrase), or None when it can.
    unavailable: Callable[[torch.Tensor], Optional[str]]


_IMPLS: dict[str, dict[str, _Impl]] = {}


def register_impl(op: str, backend: str, fn: Callable,
                  unavailable: Callable[[torch.Tensor], Optional[str]] = lambda x: None) -> None:
    """Add a backend implementation of `op` (how the triton / cuda backends slot in)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _IMPLS.setdefault(op, {})[backend] = _Impl(fn, unavailable)


def _auto_order(x: torch.Tensor) -> tuple[str, ...]:
    return ("cuda", "triton", "reference") if x.is_cuda else ("cpu", "reference")


def _pick(op: str, backend: Optional[str], x: torch.Tensor, differentiable: bool) -> Callable:
    """The implementation of `op` to run on inputs whose first tensor is `x`."""
    name = (backend or os.environ.get(BACKEND_ENV) or "auto").strip().lower()
    impls = _IMPLS.get(op, {})
    if name == "auto":
        if differentiable:  # compiled ops have no backward
            return impls["reference"].fn
        for cand in _auto_order(x):
            if cand in impls and impls[cand].unavailable(x) is None:
                return impls[cand].fn
        return impls["reference"].fn
    if name not in BACKENDS:
        raise RuntimeError(f"addp.ops: unknown backend {name!r} for {op}; expected auto or one of {BACKENDS}")
    if name not in impls:
        raise RuntimeError(f"addp.ops: backend {name!r} is unavailable for {op}: not implemented in this build")
    why = impls[name].unavailable(x)
    if why is not None:
        raise RuntimeError(f"addp.ops: backend {name!r} is unavailable for {op}: {why}")
    return impls[name].fn


def _compiled_cpu_unavailable(x: torch.Tensor) -> Optional[str]:
    if not has_compiled_ops():
        reason = (str(_C_ERROR) or type(_C_ERROR).__name__).splitlines()[0]
        return f"addp._C did not load ({reason})"
    if x.device.type != "cpu":
        return f"it needs CPU tensors, got {x.device}"
    return None


def _triton_unavailable(x: torch.Tensor) -> Optional[str]:
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return f"it needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton does not import ({exc})"
    return None


def _compiled_cuda_unavailable(x: torch.Tensor) -> Optional[str]:
    if not has_compiled_ops():
        return _compiled_cpu_unavailable(x)
    if not x.is_cuda:
        return f"it needs CUDA tensors, got {x.device}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("addp::gumbel_topk_unmask", "CUDA"):
        return "addp._C was built without CUDA kernels (ADDP_BUILD_CUDA=1 builds them)"
    return None


def _triton_op(module: str, name: str) -> Callable:
    """The Triton custom op ``name`` of ``addp.kernels.<module>`` (imported on first use)."""
    return getattr(importlib.import_module(f"addp.kernels.{module}"), name)


# --------------------------------------------------------------------------- codebook weighted sum
def codebook_weighted_sum_reference(logits, codebook, ids=None, mask=None, temperature=1.0):
    """Definition of the codebook weighted sum in plain PyTorch (see `codebook_weighted_sum`)."""
    K = codebook.shape[0]
    probs = torch.softmax(logits[..., :K].float() / temperature, dim=-1)
    out = probs @ codebook.float()
    if mask is not None:  # True = unreliable -> soft embedding; False = reliable -> codebook[ids]
        out = torch.where(mask.unsqueeze(-1), out, codebook.float()[ids])
    return out.to(codebook.dtype)


if has_compiled_ops():
    @torch.library.register_fake("addp::codebook_weighted_sum")
    def _codebook_weighted_sum_fake(logits, codebook, ids, mask, temperature):
        torch._check(codebook.dim() == 2, lambda: "codebook_weighted_sum: codebook must be 2-D (K, D)")
        return logits.new_empty((*logits.shape[:-1], codebook.shape[1]), dtype=codebook.dtype)


def _codebook_weighted_sum_compiled(logits, codebook, ids, mask, temperature):
    return torch.ops.addp.codebook_weighted_sum(logits, codebook, ids, mask, float(temperature))


register_impl("codebook_weighted_sum", "reference", codebook_weighted_sum_reference)
register_impl("codebook_weighted_sum", "cpu", _codebook_weighted_sum_compiled, _compiled_cpu_unavailable)
register_impl("codebook_weighted_sum", "triton",
              lambda lg, cb, ids, mask, t: _triton_op("weighted_sum", "codebook_weighted_sum_triton")(
                  lg, cb, ids, mask, float(t)),
              _triton_unavailable)

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check_weighted_sum_inputs(logits, codebook, ids, mask, temperature):
    def bad(msg):
        raise ValueError(f"codebook_weighted_sum: {msg}")

    if codebook.dim() != 2:
        bad(f"codebook must be 2-D (K, D), got shape {tuple(codebook.shape)}")
    if logits.dim() < 1 or logits.dtype not in _FLOATS or codebook.dtype not in _FLOATS:
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
    ``codebook[ids]`` instead. The B x L x K probabilities are never materialised by the
    compiled backends; accumulation is in float32.

    Args:
        logits: (..., V) float32/bfloat16/float16 with V >= K; only the first K columns
            (the codebook entries) are used. May be a non-contiguous view.
        codebook: (K, D) float32/bfloat16/float16 embeddings.
        ids: (...) int64 token ids in [0, K) at every position (as the reference indexes
            them all), or None. Given together with ``mask``.
        mask: (...) bool; True = unreliable (soft embedding), False = reliable (codebook[ids]).
        temperature: float > 0, divides the logits before the softmax.
        backend: "reference" | "cpu" | "triton" | "cuda" | "auto"; None reads the env var
            ADDP_OPS_BACKEND (default auto). Auto uses the reference whenever autograd needs
            gradients of the inputs.

    Returns:
        (..., D) tensor in ``codebook.dtype``, contiguous.
    """
    _check_weighted_sum_inputs(logits, codebook, ids, mask, temperature)
    differentiable = torch.is_grad_enabled() and (logits.requires_grad or codebook.requires_grad)
    fn = _pick("codebook_weighted_sum", backend, logits, differentiable)
    return fn(logits, codebook, ids, mask, temperature)


# --------------------------------------------------------------------------- Gumbel top-k unmasking
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


if has_compiled_ops():
    @torch.library.register_fake("addp::gumbel_topk_unmask")
    def _gumbel_topk_unmask_fake(logits, u1, u2, ids, mask, mask_len, tau, keep):
        torch._check(logits.dim() == 3, lambda: "gumbel_topk_unmask: logits must be 3-D (B, L, K)")
        B, L, _ = logits.shape
        return ids.new_empty((B, L)), mask.new_empty((B, L))


register_impl("gumbel_topk_unmask", "reference", gumbel_topk_unmask_reference)
register_impl("gumbel_topk_unmask", "cpu", lambda *a: torch.ops.addp.gumbel_topk_unmask(*a),
              _compiled_cpu_unavailable)
register_impl("gumbel_topk_unmask", "triton", lambda *a: _triton_op("gumbel_topk", "gumbel_topk_unmask_triton")(*a),
              _triton_unavailable)
register_impl("gumbel_topk_unmask", "cuda", lambda *a: torch.ops.addp.gumbel_topk_unmask(*a),
              _compiled_cuda_unavailable)


def gumbel_topk_unmask(logits, ids, mask, mask_len, tau: float, generator=None, top_p: float = 1.0, backend=None):
    """One unmasking step of the sampler: sample candidate ids, keep the confident ones.

    At every position a candidate is drawn from ``softmax(logits)`` by Gumbel-max (only from
    the top-p nucleus when ``top_p < 1``); ``new_ids = where(mask, sampled, ids)``. The
    confidence is ``log p(new_id) + tau * Gumbel`` (+inf at reliable positions) and
    ``new_mask`` is True at the ``mask_len`` lowest-confidence positions of each row, ties
    to the lower index (``lowest_k_mask_reference``).

    Random numbers: this wrapper draws ``u1 = torch.rand((B, L, K), float32)`` then
    ``u2 = torch.rand((B, L), float64)`` from ``generator`` -- the order and dtypes of the
    sampler's ``gumbel_noise`` calls -- and passes them to the kernel, so every backend gives
    the same result for the same generator state (up to float rounding of near-ties).

    Args:
        logits: (B, L, K) float32/bfloat16/float16, any strides (e.g. a slice ``[..., :K]``).
        ids: (B, L) int64 current ids; mask: (B, L) bool, True = unreliable.
        mask_len: int, or a one-element int64 tensor on the logits' device (read on device,
            so a captured CUDA graph can replay with a new value); clamped to [0, L].
        tau: Gumbel scale of the confidence (float >= 0).
        generator: torch.Generator on the logits' device, or None for the global RNG.
        top_p: nucleus sampling when < 1 (the nucleus is computed with torch.sort).
        backend: "reference" | "cpu" | "triton" | "cuda" | "auto"; None reads ADDP_OPS_BACKEND.

    Returns:
        (new_ids (B, L) int64, new_mask (B, L) bool).
    """
    if logits.dim() != 3 or logits.dtype not in _FLOATS:
        raise ValueError(f"gumbel_topk_unmask: logits must be (B, L, K) float32/bfloat16/float16, "
                         f"got {logits.dtype} {tuple(logits.shape)}")
    if tuple(ids.shape) != tuple(logits.shape[:2]) or tuple(mask.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"gumbel_topk_unmask: ids {tuple(ids.shape)} and mask {tuple(mask.shape)} must be (B, L) "
                         f"= {tuple(logits.shape[:2])}")
    if not 0 < top_p <= 1:
        raise ValueError(f"gumbel_topk_unmask: top_p must be in (0, 1], got {top_p}")
    B, L, K = logits.shape
    u1 = torch.rand((B, L, K), generator=generator, dtype=torch.float32, device=logits.device)
    u2 = torch.rand((B, L), generator=generator, dtype=torch.float64, device=logits.device)
    keep = nucleus_keep(logits, top_p) if top_p < 1 else None
    if isinstance(mask_len, torch.Tensor):
        mask_len = mask_len.to(device=logits.device, dtype=torch.int64).reshape(())
    else:
        mask_len = torch.full((), int(mask_len), dtype=torch.int64, device=logits.device)
    fn = _pick("gumbel_topk_unmask", backend, logits, differentiable=False)
    return fn(logits, u1, u2, ids, mask, mask_len, float(tau), keep)


# --------------------------------------------------------------------------- soft-target cross entropy
def soft_target_cross_entropy_reference(logits, target, mask, smoothing=0.1):
    """Definition (``addp.loss.soft_target_cross_entropy``): logits (B, L, V), target (B, L, K<=V)
    probabilities, mask (B, L) bool -> scalar

        mean over mask of  -(1 - eps) sum_k q_k log p_k - eps mean_v log p_v,  p = softmax(logits)

    computed in float32 (float64 for float64 logits, for gradcheck)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(acc), dim=-1)
    K = target.shape[-1]
    per_pos = -(1 - smoothing) * (target.to(acc) * logp[..., :K]).sum(-1) - smoothing * logp.mean(-1)
    m = mask.to(acc)
    return (per_pos * m).sum() / m.sum().clamp_min(1)


if has_compiled_ops():
    @torch.library.register_fake("addp::soft_target_cross_entropy")
    def _soft_ce_fake(logits, target, mask, smoothing):
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        stats = logits.new_empty(logits.shape[:2], dtype=acc)
        return logits.new_empty((), dtype=acc), stats, torch.empty_like(stats)

    @torch.library.register_fake("addp::soft_target_cross_entropy_backward")
    def _soft_ce_backward_fake(grad, logits, target, mask, lse, qsum, smoothing):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)


class _SoftTargetCrossEntropy(torch.autograd.Function):
    """Fused forward (loss, per-position logsumexp and target sum) and backward (dlogits)."""

    @staticmethod
    def forward(ctx, logits, target, mask, smoothing, forward_op, backward_op):
        loss, lse, qsum = forward_op(logits, target, mask, smoothing)
        ctx.save_for_backward(logits, target, mask, lse, qsum)
        ctx.smoothing, ctx.backward_op = smoothing, backward_op
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, target, mask, lse, qsum = ctx.saved_tensors
        dlogits = ctx.backward_op(grad, logits, target, mask, lse, qsum, ctx.smoothing)
        return dlogits, None, None, None, None, None


def _soft_ce_fused(forward_op, backward_op):
    def run(logits, target, mask, smoothing):
        return _SoftTargetCrossEntropy.apply(logits, target, mask, float(smoothing), forward_op, backward_op)
    return run


register_impl("soft_target_cross_entropy", "reference", soft_target_cross_entropy_reference)
register_impl("soft_target_cross_entropy", "cpu",
              _soft_ce_fused(lambda *a: torch.ops.addp.soft_target_cross_entropy(*a),
                             lambda *a: torch.ops.addp.soft_target_cross_entropy_backward(*a)),
              _compiled_cpu_unavailable)
register_impl("soft_target_cross_entropy", "triton",
              _soft_ce_fused(lambda *a: _triton_op("soft_ce", "soft_target_cross_entropy_triton")(*a),
                             lambda *a: _triton_op("soft_ce", "soft_target_cross_entropy_backward_triton")(*a)),
              _triton_unavailable)


def soft_target_cross_entropy(logits, target, mask, smoothing: float = 0.1, backend=None):
    """Soft-target cross entropy with label smoothing, fused with the log-softmax and the masked mean.

    Args:
        logits: (B, L, V) float32/bfloat16/float16 (float64 on the cpu/reference backends), any strides.
        target: (B, L, K <= V) probabilities (zero-padded to V by the definition); gets no gradient.
        mask: (B, L) bool; the loss is the mean over the True positions (0 when none).
        smoothing: label smoothing eps in [0, 1].
        backend: "reference" | "cpu" | "triton" | "auto"; None reads ADDP_OPS_BACKEND. The fused
            backends are differentiable w.r.t. logits (dlogits computed in one pass, never
            storing the log-probabilities); auto uses the reference when target needs a gradient.

    Returns:
        0-d float32 tensor (float64 for float64 logits).
    """
    if logits.dim() != 3 or target.dim() != 3 or tuple(mask.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"soft_target_cross_entropy: need logits (B, L, V), target (B, L, K) and mask (B, L), got "
                         f"{tuple(logits.shape)}, {tuple(target.shape)}, {tuple(mask.shape)}")
    if target.shape[:2] != logits.shape[:2] or target.shape[-1] > logits.shape[-1]:
        raise ValueError(f"soft_target_cross_entropy: target {tuple(target.shape)} must be (B, L, K <= V) "
                         f"for logits {tuple(logits.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"soft_target_cross_entropy: mask must be bool, got {mask.dtype}")
    if not 0 <= smoothing <= 1:
        raise ValueError(f"soft_target_cross_entropy: smoothing must be in [0, 1], got {smoothing}")
    differentiable = torch.is_grad_enabled() and target.requires_grad
    fn = _pick("soft_target_cross_entropy", backend, logits, differentiable)
    return fn(logits, target, mask, smoothing)
