"""Transformer building blocks shared by the token predictor and the ADDP network.

Parameter names follow the official MAGE/ADDP code (`norm1`, `attn.qkv`, `attn.proj`,
`norm2`, `mlp.fc1`, `mlp.fc2`, `mlm_layer.fc/ln/bias`) so official checkpoints load as-is.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp

from .. import ops
from ..runtime.extras import missing

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("sdpa", "xformers", "math")
# The attention implementation of every Attention module, chosen once for the process:
#   sdpa      torch's scaled_dot_product_attention (flash / memory-efficient / cuDNN kernels)
#   xformers  xformers.ops.memory_efficient_attention, when it imports and its kernels run for
#             this torch and device (probed once; otherwise a log line and sdpa)
#   math      softmax(QK^T / sqrt(d)) V in fp32 with the attention matrix materialised, as the
#             official code does: the parity path
# Default from ADDP_ATTENTION (else "sdpa"); change it with set_attention_backend().
ATTENTION_BACKEND = os.environ.get("ADDP_ATTENTION", "sdpa")
_XFORMERS: dict = {}  # device type -> xformers.ops module, or None when it cannot run there


def _process_choice(variable: str, choices: tuple, what: str):
    """(setter, context manager) of the module-level choice ``variable`` among ``choices``."""
    def choose(name: str) -> str:
        if name not in choices:
            raise ValueError(f"{what} backend must be one of {choices}, got {name!r}")
        old = globals()[variable]
        globals()[variable] = name
        return old

    @contextlib.contextmanager
    def chosen(name: str):
        old = choose(name)
        try:
            yield
        finally:
            choose(old)

    choose.__doc__ = f"Choose the {what} implementation of every module (one of {choices}); returns the old one."
    chosen.__doc__ = f"``with ...({choices[-1]!r}): ...`` runs the block with another {what} backend."
    return choose, chosen


set_attention_backend, attention_backend = _process_choice("ATTENTION_BACKEND", ATTENTION_BACKENDS, "attention")


DROPOUT_BACKENDS = ("philox", "torch")
# The dropout of every Dropout module and of the attention probabilities:
#   philox  addp.ops.dropout on CPU tensors when addp._C is loaded: the mask from a counter-based
#           generator, computed by all threads (torch's CPU dropout draws it element by element
#           from one sequential generator); torch's dropout elsewhere (its CUDA kernel is a
#           fused Philox kernel already)
#   torch   torch's dropout everywhere, as the official code
# Both drop with the same probability; the masks differ. Default from ADDP_DROPOUT (else
# "philox"); change it with set_dropout_backend().
DROPOUT_BACKEND = os.environ.get("ADDP_DROPOUT", "philox")


set_dropout_backend, dropout_backend = _process_choice("DROPOUT_BACKEND", DROPOUT_BACKENDS, "dropout")


def _philox_dropout(x: torch.Tensor) -> bool:
    return DROPOUT_BACKEND == "philox" and x.device.type == "cpu" and ops.has_compiled_ops()


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Dropout with the process-wide backend (``DROPOUT_BACKEND``)."""
    if not training or p == 0:
        return x
    if DROPOUT_BACKEND not in DROPOUT_BACKENDS:
        raise ValueError(f"ADDP_DROPOUT={DROPOUT_BACKEND!r} is not one of {DROPOUT_BACKENDS}")
    return ops.dropout(x, p) if _philox_dropout(x) else F.dropout(x, p, True)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments and attributes) running ``dropout`` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def xformers_ops(device: torch.device):
    """xformers.ops when its memory-efficient attention runs on ``device``, else None.

    Probed once per device type with a tiny call (xformers wheels are built for one torch
    version; a mismatch imports but fails in the kernel), logging why it falls back.
    """
    kind = torch.device(device).type
    if kind not in _XFORMERS:
        _XFORMERS[kind] = None
        if importlib.util.find_spec("xformers") is None:
            log.warning("addp: %s; using torch's scaled_dot_product_attention",
                        missing("xformers", "xformers attention"))
            return None
        try:
            import xformers.ops as xops

            q = torch.zeros(1, 8, 1, 16, device=device, dtype=torch.float16 if kind == "cuda" else torch.float32)
            xops.memory_efficient_attention(q, q, q)
            _XFORMERS[kind] = xops
        except Exception as exc:  # kernels that do not load / run here
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            log.warning("addp: xformers attention unavailable on %s (%s); using torch's "
                        "scaled_dot_product_attention", kind, reason)
    return _XFORMERS[kind]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Multi-head attention with the process-wide backend. q, k, v: (B, H, N, Dh) -> (B, H, N, Dh)."""
    backend = ATTENTION_BACKEND
    if backend == "xformers":
        xops = xformers_ops(q.device)
        if xops is not None:  # xformers takes (B, N, H, Dh)
            out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  p=dropout_p)
            return out.transpose(1, 2)
        backend = "sdpa"
    if backend == "sdpa" and dropout_p > 0 and _philox_dropout(q):
        backend = "math"  # torch's CPU attention draws its dropout mask with torch's dropout
    if backend == "sdpa" and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        # torch's CPU flash kernel is slow in bf16/fp16 (2.6x the fp32 time, forward + backward
        # of addp_vit_small, batch 32, 2 cores); in fp32 it beats the math path (3x forward)
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p).to(v.dtype)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if backend == "math":
        scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, N, N)
        weights = dropout(scores.softmax(dim=-1), dropout_p)
        return (weights @ v.float()).to(v.dtype)
    raise ValueError(f"ADDP_ATTENTION={backend!r} is not one of {ATTENTION_BACKENDS}")


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, Dh)
        x = attention(q, k, v, self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.mlp.drop1, self.mlp.drop2 = Dropout(drop), Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MlmHead(nn.Module):
    """Masked-token head tied to a token embedding: logits = LN(GELU(fc(x))) @ E^T + bias.

    As in the official code the tied embedding is detached: the head does not train it.
    """

    def __init__(self, in_dim: int, embed_dim: int, vocab_size: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, embed_dim)
        self.ln = nn.LayerNorm(embed_dim)
        self.bias = nn.Parameter(torch.zeros(1, 1, vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor, vocab: int | None = None) -> torch.Tensor:
        """x: (B, N, in_dim), word_embeddings: (V, embed_dim) -> logits (B, N, V), or the first
        `vocab` of them only (the others are not computed)."""
        h = self.ln(F.gelu(self.fc(x)))
        return h @ word_embeddings.detach()[:vocab].to(h.dtype).t() + self.bias[..., :vocab]


def init_transformer_weights(module: nn.Module) -> None:
    """xavier-uniform Linear weights, zero biases, unit LayerNorms (MAE/MAGE init)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
