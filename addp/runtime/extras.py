"""Optional dependencies: the extra of the package that installs each, and one import that
fails with one line naming that extra (`pip install "addp[metrics]"`) instead of a traceback."""
from __future__ import annotations

import importlib

from ..errors import AddpError

# top-level module -> (the distribution's name, the extra of addp that installs it)
EXTRAS = {
    "torch_fidelity": ("torch-fidelity", "metrics"),
    "onnx": ("onnx", "onnx"),
    "onnxscript": ("onnxscript", "onnx"),
    "onnxruntime": ("onnxruntime", "onnx"),
    "xformers": ("xformers", "xformers"),
    "diffusers": ("diffusers", "diffusers"),
}


def missing(module: str, purpose: str) -> str:
    """The one line that says `purpose` needs `module`'s distribution and which extra installs it."""
    dist, extra = EXTRAS[module.split(".")[0]]
    return f'{purpose} needs {dist}, which is not installed: pip install "addp[{extra}]"'


def require(module: str, purpose: str):
    """Import `module` (a name under one of EXTRAS) or raise AddpError(`missing(...)`)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise AddpError(missing(module, purpose)) from None
