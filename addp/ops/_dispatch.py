"""Where the fused ops' kernels are registered and how a call picks one.

Every op is one ``torch.library`` operator in the ``addp`` namespace, its schema defined in its
module. The dispatcher routes by device:

    CPU    the C++ kernel of ``addp._C`` (csrc/), when the extension loaded
    CUDA   the Triton kernel of ``addp.kernels`` (kernels/), when triton imports

Under ``TRITON_INTERPRET=1`` Triton runs on the CPU: the Triton kernels are then registered for
CPU tensors as well (and ``addp._C`` is not loaded), so the interpreter exercises the same op
path a GPU runs. Devices without a kernel use the plain-PyTorch reference.

The override (``backend=`` argument, else the env var ``ADDP_OPS_BACKEND``, else ``auto``)
only chooses between what the dispatcher runs, the reference, and the CUDA C++ unmasking
kernel (``backend="cuda"``; never chosen by ``auto``). ``cuda`` names the CUDA C++ kernels:
an op that has none (every op but unmasking) runs what ``auto`` picks, so
``ADDP_OPS_BACKEND=cuda`` switches the unmasking kernel and leaves the other ops as they are.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("addp.ops")

BACKENDS = ("reference", "cpu", "triton", "cuda")
BACKEND_ENV = "ADDP_OPS_BACKEND"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None

LIB = torch.library.Library("addp", "FRAGMENT")  # holds the schemas and Python registrations

_compiled_error: Optional[str] = "not loaded yet"


def load_compiled() -> None:
    """Load ``addp._C`` (its CPU kernels register themselves); say once, at WARNING, if it fails."""
    global _compiled_error
    if INTERPRET:
        _compiled_error = "TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors instead"
        log.info("addp._C not loaded: %s", _compiled_error)
        return
    try:
        _import_compiled()
    except (ImportError, OSError, RuntimeError) as exc:  # not built, or built against another torch
        _compiled_error = (str(exc) or type(exc).__name__).splitlines()[0]
        log.warning("addp._C (the compiled CPU kernels) did not load: %s. The fused ops run their "
                    "plain-PyTorch references on CPU. Build it with "
                    "`pip install --no-build-isolation -e .` from the repository root.", _compiled_error)
    else:
        _compiled_error = None


def installed_compiled() -> Optional[Path]:
    """``addp/_C*.so`` of another copy of the package on ``sys.path`` (a ``pip install .``
    shadowed by the source tree when a command runs from the repository root), or None."""
    here = Path(__file__).resolve().parents[1]
    for entry in sys.path:
        other = Path(entry or ".").resolve() / "addp"
        if other == here or not other.is_dir():
            continue
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            if (other / f"_C{suffix}").is_file():
                return other / f"_C{suffix}"
    return None


def _import_compiled() -> None:
    """``addp._C`` of this copy, else the installed copy's, saying once which copy runs."""
    if any((Path(__file__).resolve().parents[1] / f"_C{s}").is_file() for s in importlib.machinery.EXTENSION_SUFFIXES):
        importlib.import_module("addp._C")
        return
    path = installed_compiled()
    if path is None:
        importlib.import_module("addp._C")  # raises the usual ModuleNotFoundError
        return
    spec = importlib.util.spec_from_file_location("addp._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["addp._C"] = module
    log.warning("addp: running the source tree %s with the compiled kernels of the installed copy %s "
             "(it has no addp._C of its own)", Path(__file__).resolve().parents[1], path.parent)


def compiled_error() -> Optional[str]:
    """Why ``addp._C`` is not loaded, or None when it is."""
    return _compiled_error


def register_triton(op: str, module: str, launcher: str) -> None:
    """Register ``addp.kernels.<module>.<launcher>`` as the CUDA kernel of ``addp::<op>``
    (and the CPU kernel under TRITON_INTERPRET=1); triton is imported on the first call."""
    if not HAS_TRITON:
        return

    def launch(*args):
        return getattr(importlib.import_module(f"addp.kernels.{module}"), launcher)(*args)

    for key in ("CUDA", "CPU") if INTERPRET else ("CUDA",):
        LIB.impl(op, launch, key)


# (op, device type) -> the backend whose kernel the dispatcher holds: read once, after every
# registration, as a plain dict that torch.compile can trace through.
_ROUTES: dict[tuple[str, str], str] = {}


def record_routes(ops: dict[str, Optional[str]]) -> None:
    """Note which backend's kernel the dispatcher holds for each op on CPU and CUDA, and for
    its CUDA C++ op when it has one ({op: cuda_op or None})."""
    def has(op, key):
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"addp::{op}", key)

    for op, cuda_op in ops.items():
        if has(op, "CPU"):
            _ROUTES[(op, "cpu")] = "triton" if INTERPRET else "cpu"
        if has(op, "CUDA"):
            _ROUTES[(op, "cuda")] = "triton"
        if cuda_op is not None and has(cuda_op, "CUDA"):
            _ROUTES[(cuda_op, "cuda")] = "cuda"


def routed(op: str, device: torch.device) -> Optional[str]:
    """The backend the dispatcher runs for ``addp::<op>`` on ``device``, None when it has no kernel."""
    return _ROUTES.get((op, device.type))


def _why_not(op: str, name: str, device: torch.device, cuda_op: Optional[str]) -> str:
    """Why backend ``name`` cannot run ``op`` on ``device`` (a short phrase)."""
    if name == "cpu":
        if _compiled_error is not None:
            return f"addp._C did not load ({_compiled_error})"
        return f"it needs CPU tensors, got {device}"
    if name == "triton":
        if not HAS_TRITON:
            return "triton is not installed"
        return f"it needs CUDA tensors (or TRITON_INTERPRET=1), got {device}"
    if _compiled_error is not None:
        return f"addp._C did not load ({_compiled_error})"
    if device.type != "cuda":
        return f"it needs CUDA tensors, got {device}"
    return "addp._C was built without CUDA kernels (ADDP_BUILD_CUDA=1 builds them)"


def choose(op: str, backend: Optional[str], device: torch.device, needs_reference: bool = False,
           cuda_op: Optional[str] = None) -> str:
    """The backend that runs ``op`` on ``device``: "reference", "cpu", "triton" or "cuda".

    ``backend`` None reads ADDP_OPS_BACKEND (default "auto"). Auto takes what the dispatcher
    runs on the device, or the reference when there is no kernel or ``needs_reference`` (autograd
    needs a gradient the kernels do not compute). "cuda" on an op without a CUDA C++ kernel
    (``cuda_op`` None) is auto. An explicit backend that cannot run raises a one-line RuntimeError.
    """
    name = (backend or os.environ.get(BACKEND_ENV) or "auto").strip().lower()
    here = routed(op, device)
    if name == "cuda" and cuda_op is None:  # no CUDA C++ kernel for this op
        name = "auto"
    if name == "auto":
        return "reference" if needs_reference or here is None else here
    if name not in BACKENDS:
        raise RuntimeError(f"addp.ops: unknown backend {name!r} for {op}; expected auto or one of {BACKENDS}")
    if name == "reference" or name == here:
        return name
    if name == "cuda" and cuda_op is not None and device.type == "cuda" and (cuda_op, "cuda") in _ROUTES:
        return name
    raise RuntimeError(f"addp.ops: backend {name!r} is unavailable for {op}: {_why_not(op, name, device, cuda_op)}")
