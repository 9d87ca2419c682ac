"""Dropout whose mask comes from a counter-based generator (Philox4x32-10), fused with the scaling.

Two ops: ``addp::dropout(x, p, seed) -> (out, keep)`` and its backward
``addp::dropout_backward(grad, keep, p) -> dx``, tied by ``torch.library.register_autograd``;
CPU kernels in csrc/dropout.cpp; a backward that torch.compile traces computes dx with plain
ops instead, which inductor fuses into the kernels around it. Element i (row-major) is kept
when word i % 4 of Philox4x32-10 at counter i // 4 under the key ``seed`` is at least
floor(p * 2^32): every element's draw is independent of the others, so the kernel splits a
tensor over threads and vector lanes and still gives the same mask. torch's CPU dropout draws
its mask element by element from one sequential generator, which costs more than the layer it
drops on a CPU (the ADDP network's attention matrices).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._dispatch import LIB, choose

OP = "dropout"
BACKWARD_OP = "dropout_backward"
LIB.define(f"{OP}(Tensor x, float p, Tensor seed) -> (Tensor out, Tensor keep)")
LIB.define(f"{BACKWARD_OP}(Tensor grad, Tensor keep, float p) -> Tensor")

_LOW32 = 0xFFFFFFFF
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)


@torch.library.register_fake(f"addp::{OP}", lib=LIB)
def _fake(x, p, seed):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(x.shape, dtype=torch.bool, device=x.device)


@torch.library.register_fake(f"addp::{BACKWARD_OP}", lib=LIB)
def _backward_fake(grad, keep, p):
    return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)


def _setup_context(ctx, inputs, output):
    _, p, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])
    ctx.p = p


def _backward(ctx, grad, _grad_keep):
    (keep,) = ctx.saved_tensors
    # A compiled backward gets plain ops, which inductor fuses. torch 2.11 reports
    # is_compiling() False while AOTAutograd traces the backward; its grad is then a tensor
    # subclass (FunctionalTensor), which the kernel could not take anyway.
    if torch.compiler.is_compiling() or type(grad) is not torch.Tensor:
        return _kept_scaled(grad, keep, ctx.p), None, None
    return torch.ops.addp.dropout_backward(grad, keep, ctx.p), None, None


torch.library.register_autograd(f"addp::{OP}", _backward, setup_context=_setup_context, lib=LIB)


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * m for int64 tensors a < 2^32, in 16-bit pieces so
    that no intermediate leaves int64."""
    t = a * (m & 0xFFFF)
    u = a * (m >> 16) + (t >> 16)
    return u >> 16, ((u & 0xFFFF) << 16) | (t & 0xFFFF)


def philox4x32_10(counter: tuple, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 (Salmon et al., SC'11) in plain PyTorch: four int64 tensors of 32-bit
    counter words (broadcastable) and a key of two 32-bit ints -> the four output words."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = key
    for round in range(10):
        if round:
            k0, k1 = (k0 + _KEY_STEPS[0]) & _LOW32, (k1 + _KEY_STEPS[1]) & _LOW32
        hi0, lo0 = _mulhilo(c0, _MULTIPLIERS[0])
        hi1, lo1 = _mulhilo(c2, _MULTIPLIERS[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def keep_mask_reference(shape, p: float, seed: int, device=None) -> torch.Tensor:
    """The kept elements of a tensor of ``shape`` (bool), as the module docstring defines them."""
    if p >= 1:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    n = math.prod(shape)
    seed &= (1 << 64) - 1
    block = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    words = torch.stack(philox4x32_10((block & _LOW32, block >> 32, 0, 0), (seed & _LOW32, seed >> 32)), dim=1)
    threshold = min(int(p * 2 ** 32), _LOW32)
    return (words.reshape(-1)[:n] >= threshold).reshape(shape)


def _kept_scaled(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """``where(keep, x / (1 - p), 0)``, the product in float32 (float64 for float64 x), rounded
    to x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = 0.0 if p >= 1 else 1.0 / (1.0 - p)
    return torch.where(keep, x.to(acc) * scale, 0).to(x.dtype)


def dropout_reference(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Definition: ``where(keep, x / (1 - p), 0)`` with ``keep = keep_mask_reference``, the
    product computed in float32 (float64 for float64 inputs) and rounded to x's dtype."""
    return _kept_scaled(x, keep_mask_reference(x.shape, p, seed, x.device), p)


def draw_seed(generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A 0-d int64 CPU tensor of 63 random bits from ``generator`` (torch's CPU generator when None)."""
    return torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64, generator=generator)


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, generator: Optional[torch.Generator] = None,
            backend=None) -> torch.Tensor:
    """Dropout with a Philox mask: elements zeroed with probability p, the rest scaled by 1 / (1 - p).

    Args:
        x: float32/float64/bfloat16/float16 tensor, any shape and strides.
        p: drop probability in [0, 1].
        training: when False (or p == 0), x is returned as it is.
        generator: CPU generator the per-call key is drawn from (torch's when None).
        backend: "reference" | "cpu" | "auto"; None reads ADDP_OPS_BACKEND.

    Returns a tensor of x's shape and dtype (contiguous), differentiable w.r.t. x.
    """
    if not 0 <= p <= 1:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    if not x.is_floating_point():
        raise ValueError(f"dropout: x must be floating point, got {x.dtype}")
    if not training or p == 0:
        return x
    seed = draw_seed(generator)
    if choose(OP, backend, x.device) == "reference":
        return dropout_reference(x, p, int(seed))
    return torch.ops.addp.dropout(x, float(p), seed)[0]
