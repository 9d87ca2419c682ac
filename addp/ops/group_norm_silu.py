"""GroupNorm followed by SiLU in one op: the pre-activation of every VQ residual block.

``addp::group_norm_silu(x, weight, bias, groups, eps) -> y`` with
``y = silu(group_norm(x, groups, weight, bias, eps))``: statistics per (sample, group) and
the arithmetic in float32 or wider, y rounded once to x's dtype and laid out as x (channels-last
stays channels-last). The CPU kernel (csrc/group_norm_silu.cpp) reads x twice and writes y once,
where torch's eager GroupNorm and SiLU take separate passes and inductor's fused kernel reads
the channels-last 256 px activations slowly (timings: docs/speed.md). Inference only: inputs
that need a gradient run the reference, which autograd differentiates.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._dispatch import LIB, choose

OP = "group_norm_silu"
LIB.define(f"{OP}(Tensor x, Tensor? weight, Tensor? bias, int groups, float eps) -> Tensor")

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _layout_of(x: torch.Tensor) -> torch.Tensor:
    """The tensor whose layout the output takes: x itself when it is dense in NCHW or
    channels-last order, else its contiguous copy."""
    dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    return x if dense else x.contiguous()


@torch.library.register_fake(f"addp::{OP}", lib=LIB)
def _fake(x, weight, bias, groups, eps):
    return torch.empty_like(_layout_of(x))


def group_norm_silu_reference(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                              groups: int, eps: float = 1e-5) -> torch.Tensor:
    """Definition: ``silu(group_norm(x, groups, weight, bias, eps))`` computed in float32
    (float64 for float64 inputs), rounded to x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32

    def cast(t):
        return None if t is None else t.to(acc)

    return F.silu(F.group_norm(x.to(acc), groups, cast(weight), cast(bias), eps)).to(x.dtype)


def group_norm_silu(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], groups: int,
                    eps: float = 1e-5, backend=None) -> torch.Tensor:
    """``silu(group_norm(x, groups, weight, bias, eps))``, fused on CPUs.

    Args:
        x: (N, C, *) floating-point tensor, C divisible by ``groups``; any layout (NCHW and
            channels-last are read in place).
        weight, bias: (C,) affine parameters, or None.
        backend: "reference" | "cpu" | "auto"; None reads ADDP_OPS_BACKEND.

    Returns a tensor of x's shape, dtype and layout. Runs the reference (differentiable) when
    autograd needs a gradient of any input, or for float64.
    """
    if x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"group_norm_silu: x must be a floating-point (N, C, *) tensor, got {x.dtype} {tuple(x.shape)}")
    if groups < 1 or x.shape[1] % groups:
        raise ValueError(f"group_norm_silu: {x.shape[1]} channels are not divisible into {groups} groups")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    needs_reference = needs_grad or x.dtype not in _KERNEL_DTYPES
    if choose(OP, backend, x.device, needs_reference=needs_reference) == "reference":
        return group_norm_silu_reference(x, weight, bias, groups, eps)
    return torch.ops.addp.group_norm_silu(x, weight, bias, groups, float(eps))
