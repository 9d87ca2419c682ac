"""Fused ops of addp, one module each, and the backend each runs on a device.

    codebook_weighted_sum        weighted_sum.py    softmax(logits[..., :K] / T) @ codebook
    gumbel_topk_unmask           gumbel_topk.py     one unmasking step of the sampler
    soft_target_cross_entropy    soft_ce.py         the training loss, forward and backward
    dropout                      philox_dropout.py  dropout with a counter-based (Philox) mask
    group_norm_silu              group_norm_silu.py silu(group_norm(x)), the VQ blocks' pre-activation
    conv3x3_winograd             winograd_conv.py   3x3 convolution by Winograd F(4x4, 3x3), the VQ blocks' convs

Each is a ``torch.library`` op (``torch.ops.addp.*``) with a fake, so ``torch.compile`` and
CUDA graph capture see one opaque op with static shapes, and a plain-PyTorch reference (its
definition, ``*_reference``). Backends:

    reference  plain PyTorch, any device, differentiable
    cpu        C++ kernel of the compiled extension ``addp._C`` (CPU tensors)
    triton     Triton kernel of ``addp.kernels`` (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
    cuda       CUDA C++ kernel of ``addp._C`` (gumbel_topk_unmask only; explicit request only)

The dispatcher picks the kernel by device; ``backend=`` or the env var ``ADDP_OPS_BACKEND``
overrides it (see ``_dispatch.choose``). ``backends(device)`` says what runs where.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import _dispatch, gumbel_topk, philox_dropout, soft_ce, weighted_sum, winograd_conv
from . import group_norm_silu as _group_norm_silu  # the module; the name group_norm_silu is its function
from ._dispatch import BACKEND_ENV, BACKENDS
from .gumbel_topk import (
    gumbel, gumbel_topk_unmask, gumbel_topk_unmask_reference, lowest_k_mask_reference, nucleus_keep,
)
from .group_norm_silu import group_norm_silu, group_norm_silu_reference
from .philox_dropout import dropout, dropout_reference
from .soft_ce import soft_target_cross_entropy, soft_target_cross_entropy_reference
from .weighted_sum import codebook_weighted_sum, codebook_weighted_sum_reference
from .winograd_conv import conv3x3, conv3x3_reference, winograd_weight

_dispatch.load_compiled()  # after the schemas above: its C++ kernels register under them

__all__ = [
    "BACKENDS", "BACKEND_ENV", "backends", "codebook_weighted_sum", "codebook_weighted_sum_reference", "dropout",
    "dropout_reference", "group_norm_silu", "group_norm_silu_reference", "gumbel",
    "gumbel_topk_unmask", "gumbel_topk_unmask_reference", "has_compiled_ops", "lowest_k_mask_reference",
    "nucleus_keep", "soft_target_cross_entropy", "soft_target_cross_entropy_reference",
    "conv3x3", "conv3x3_reference", "winograd_weight",
]

# op (torch.ops.addp.<op>, also the public function's name) -> its CUDA C++ op for backend="cuda", if any
_OPS = {module.OP: getattr(module, "CUDA_OP", None)
        for module in (weighted_sum, gumbel_topk, soft_ce, philox_dropout, _group_norm_silu, winograd_conv)}
_dispatch.record_routes(_OPS)


def has_compiled_ops() -> bool:
    """True when the compiled extension ``addp._C`` loaded (its CPU kernels serve ``torch.ops.addp``)."""
    return _dispatch.compiled_error() is None


def backends(device: Union[str, torch.device] = "cpu", backend: Optional[str] = None) -> dict[str, str]:
    """Which backend each fused op runs on ``device`` ({op name: "reference" | "cpu" | "triton" |
    "cuda"}) for inputs that need no gradient, under ``backend`` (None: ADDP_OPS_BACKEND, else
    auto). Where the requested backend cannot run, the value is the op's one-line error."""
    device = torch.device(device)
    result = {}
    for op, cuda_op in _OPS.items():
        try:
            result[op] = _dispatch.choose(op, backend, device, cuda_op=cuda_op)
        except RuntimeError as exc:
            result[op] = str(exc)
    return result
