"""Which torch devices exist here: one check for the commands' --device and the pipeline's
``device=`` / ``pipe.to(...)``, so a bad name is one line instead of a deep RuntimeError."""

from __future__ import annotations

import torch

from ..errors import AddpError

KNOWN = "cpu, cuda, cuda:N or mps"


def parse_device(spec) -> torch.device:
    """`spec` (a str or torch.device) as a torch.device of a known type, present here or not."""
    if isinstance(spec, torch.device):
        dev = spec
    elif isinstance(spec, str):
        try:
            dev = torch.device(spec)
        except RuntimeError:
            raise AddpError(f"not a device: {spec!r} ({KNOWN})") from None
    else:
        raise AddpError(f"a device is a string or torch.device ({KNOWN}), got {type(spec).__name__}")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise AddpError(f"{spec}: unsupported device type ({KNOWN})")
    return dev


def check_device(spec) -> torch.device:
    """`spec` (a str or torch.device) as a torch.device that this machine has."""
    dev = parse_device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AddpError(f"{spec}: this machine has no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise AddpError(f"{spec}: this machine has {torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise AddpError(f"{spec}: MPS is not available here")
    return dev
