"""Fused ops and the one place that picks their backend.

Each op has a plain-PyTorch reference (its definition, used by tests) and faster backends:

    reference  plain PyTorch, any device, differentiable
    cpu        C++ kernel of the compiled extension ``addp._C`` (CPU tensors)
    triton     Triton kernel in ``addp.kernels`` (CUDA tensors)        -- not built yet
    cuda       CUDA C++ kernel of ``addp._C`` (CUDA tensors)            -- not built yet

The backend comes from the ``backend=`` argument, else the env var ``ADDP_OPS_BACKEND``,
else "auto": the fastest one available for the inputs' device, falling back to the
reference. An explicitly requested backend that cannot run raises a one-line RuntimeError.

Compiled ops are ``torch.library`` custom ops (schemas in csrc/ops.cpp, fake implementations
below), so ``torch.compile`` sees one opaque op with static output shapes.
"""
from __future__ import annotations

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
