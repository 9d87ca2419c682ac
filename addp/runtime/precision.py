"""Numeric precision of the networks: the --precision names, what "auto" means on a device,
and their autocast dtypes. The one place that decides the precision of generation,
inpainting, visualisation and training: a command resolves its --precision once per run
(``resolve_precision``) and passes the result down; the device's process settings are a
separate call (``addp.runtime.tuning.tune_for_device``)."""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 in hardware: CUDA GPUs that support it, and x86
    CPUs with AVX512-BF16 or AMX-BF16 (which oneDNN's bf16 convolutions and matmuls use)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return False


def resolve_precision(precision: str, device: torch.device, training: bool = False) -> str:
    """A precision name with "auto" replaced by the device's default, as the official code
    (autocast on GPUs): "bf16" on GPUs and, for generation, on CPUs where bf16 is native (there
    it is measured faster, docs/speed.md); "fp16" on GPUs without bf16, else "fp32". Training
    on a CPU stays fp32: the demo's results (docs/results.md) were measured so."""
    if precision != "auto":
        return precision
    device = torch.device(device)
    if training and device.type == "cpu":
        return "fp32"
    if native_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "fp32"


def autocast_dtype(precision: str, device: torch.device, training: bool = False) -> torch.dtype | None:
    """The autocast dtype of a precision name on `device` (None: plain fp32)."""
    name = resolve_precision(precision, device, training)
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """A context running the networks on ``device`` under autocast to ``dtype``; None turns
    autocast off (plain fp32)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def precision_context(precision: str | None, device: torch.device):
    """The autocast of a precision name on ``device``; None leaves the caller's context as it
    is (the Python API's default)."""
    if precision is None:
        return contextlib.nullcontext()
    return autocast(device, autocast_dtype(precision, device))
