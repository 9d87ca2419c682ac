"""Process-wide speed settings for the device a job runs on: applied by the commands
(``python -m addp.generate``, ``addp.train``, ...) and the trainer; scripts of your own call
``addp.tune_for_device(device)``.

GPUs: cuDNN autotuning (``torch.backends.cudnn.benchmark``).

CPUs on glibc: freed memory stays in the process. By default glibc's malloc maps each block
over its mmap threshold (128 KiB at first, then the largest block freed so far, up to 32 MiB)
afresh and unmaps it when freed, and trims its heap whenever more than twice that threshold
is free at the top. A 256 px VQ tokenizer pass allocates and frees tensors of 16 MiB dozens
of times, so steps fault their memory in again page by page, more or less depending on the
heap's history (docs/speed.md measures it). ``mallopt`` with the mmap threshold at its
largest value (32 MiB) and the trim threshold at 2 GiB keeps those blocks for reuse. The
process keeps its peak heap; ``ADDP_MALLOC=system`` keeps glibc's defaults (any other value,
or none, applies the settings). Nothing changes when another allocator is preloaded
(jemalloc, tcmalloc, mimalloc) or ``GLIBC_TUNABLES`` sets malloc's own tunables.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

from .devices import parse_device

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # the largest value glibc accepts on 64-bit systems
TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes an int


def tune_for_device(device: torch.device) -> None:
    """The settings of the module docstring for ``device``'s type (idempotent)."""
    kind = parse_device(device).type  # settings only: the device need not be here
    if kind == "cuda":
        torch.backends.cudnn.benchmark = True
    elif kind == "cpu":
        keep_freed_memory()


def malloc_choice() -> str | None:
    """Why glibc's malloc settings are left alone (a short reason), or None to set them."""
    if os.environ.get("ADDP_MALLOC", "").lower() == "system":
        return "ADDP_MALLOC=system"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "another allocator is preloaded"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc's tunables"
    return None


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (once per process). Returns whether they were set:
    False on other C libraries, or when ``malloc_choice`` gives a reason not to."""
    reason = malloc_choice()
    libc = _glibc()
    if reason or libc is None:
        log.debug("malloc settings left alone: %s", reason or "not glibc")
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def _glibc():
    """The process's C library when it is glibc (looked up in the loaded symbols), else None."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc
