"""3x3 convolution (stride 1, padding 1) by Winograd's F(4x4, 3x3): the VQ networks' convolutions.

``addp::conv3x3_winograd(x, u, bias, residual, upsample) -> y`` with
``u = winograd_weight(weight)``: the same result as ``F.conv2d(x, weight, bias, padding=1) +
residual`` (residual optional, added as the output is written; with ``upsample``, x is first
upsampled 2x by nearest neighbour, which the kernel reads in place) with 36 multiplications per 4x4 output tile
and channel pair instead of 144 (Lavin & Gray, 2016). The CPU kernel (csrc/winograd.cpp)
takes float32 inputs with 4 to 128 channels in and out, multiples of 4 (wider layers' 36
transformed weight matrices outgrow the caches the kernel blocks for), and returns
channels-last outputs; every other case runs the reference.

Precision: the transforms add rounding of their own, so the result differs from a direct
convolution by a few float32 ulps of the output's magnitude (the tests bound it at 2e-5 of
the largest output); direct convolutions in float32 differ from the float64 result by less.
Inference only: inputs that need a gradient run the reference, which autograd differentiates.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._dispatch import LIB, choose

OP = "conv3x3_winograd"
LIB.define(f"{OP}(Tensor x, Tensor u, Tensor? bias, Tensor? residual=None, bool upsample=False) -> Tensor")

# G of F(4x4, 3x3): the weight transform U = G g G^T (6x6 per channel pair).
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))


@torch.library.register_fake(f"addp::{OP}", lib=LIB)
def _fake(x, u, bias, residual=None, upsample=False):
    N, _, H, W = x.shape
    scale = 2 if upsample else 1
    return x.new_empty((N, u.shape[2], H * scale, W * scale)).contiguous(memory_format=torch.channels_last)


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """(K, C, 3, 3) weight -> (36, C, K) float32: G g G^T for each channel pair, computed in
    float64, point-major (point = 6 * row + column of the transformed tile)."""
    K, C = weight.shape[:2]
    G = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("pi,kcij,qj->pqck", G, weight.detach().double(), G)
    return u.reshape(36, C, K).float().contiguous()


def conv3x3_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      residual: Optional[torch.Tensor] = None, upsample: bool = False) -> torch.Tensor:
    """Definition: ``F.conv2d(x, weight, bias, padding=1)``, plus ``residual`` when given; with
    ``upsample``, of ``F.interpolate(x, scale_factor=2, mode="nearest")``."""
    if upsample:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    y = F.conv2d(x, weight, bias, padding=1)
    return y if residual is None else y + residual


MAX_CHANNELS = 128


def kernel_applies(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor] = None) -> bool:
    """Whether the kernel takes these inputs: float32 (no autocast), 3x3 weights, channel
    counts that are multiples of 4 up to MAX_CHANNELS, no gradient asked of x, the weight or
    the residual."""
    if x.dtype != torch.float32 or x.dim() != 4 or weight.shape[2:] != (3, 3) or x.shape[1] != weight.shape[1]:
        return False
    if residual is not None and residual.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, residual)):
        return False
    return all(c % 4 == 0 and 0 < c <= MAX_CHANNELS for c in weight.shape[:2])


def uses_kernel(x: torch.Tensor, weight: torch.Tensor, backend=None, residual: Optional[torch.Tensor] = None) -> bool:
    """Whether ``conv3x3(x, weight, residual=residual, backend=backend)`` runs the kernel: inputs
    it does not take run the reference whatever the backend (a forced "cpu" backend included)."""
    applies = kernel_applies(x, weight, residual)
    return choose(OP, backend, x.device, needs_reference=not applies) != "reference" and applies


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
            u: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None, upsample: bool = False,
            backend=None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1) + residual`` for a (K, C, 3, 3) weight, by
    Winograd on CPUs.

    u: ``winograd_weight(weight)`` when the caller keeps it (the VQ layers do), else computed.
    residual: a tensor of the output's shape added to it (the kernel adds it as it writes the
    output), or None.
    upsample: convolve x upsampled 2x by nearest neighbour (the kernel reads x in place).
    backend: "reference" | "cpu" | "auto"; None reads ADDP_OPS_BACKEND. Returns a channels-last
    tensor from the kernel, the reference's layout otherwise.
    """
    if not uses_kernel(x, weight, backend, residual):
        return conv3x3_reference(x, weight, bias, residual, upsample)
    return torch.ops.addp.conv3x3_winograd(x, winograd_weight(weight) if u is None else u, bias, residual, upsample)

