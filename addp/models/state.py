"""State dicts in files: the tensors of a safetensors or torch file read safely (never unpickling
objects), refused when not finite, and loaded strictly into a model with one-line errors."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError, first_line


# -- reading raw files ---------------------------------------------------------------------
def read_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Tensors of a checkpoint file and, for our format, its component description."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if path.suffix == ".safetensors":
        tensors, components = _read_safetensors(path)
    else:
        tensors, components = _read_torch(path), None
    check_finite(tensors, str(path))
    return tensors, components



def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or Inf, naming the first such tensor."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{source}: tensor {name} holds non-finite values (NaN or Inf); refusing to load it")



def _read_safetensors(path: Path):
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(e)})") from None
    metadata = (header.get("__metadata__") if isinstance(header, dict) else None) or {}
    if "addp_components" not in metadata:
        raise CheckpointError(f"{path} is a safetensors file without an addp component description")
    try:
        components = json.loads(metadata["addp_components"])
    except ValueError:
        components = None
    if not isinstance(components, dict) or not all(isinstance(c, dict) for c in components.values()):
        raise CheckpointError(f"{path}: its addp component description is not a JSON object of configs")
    return tensors, components



def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds Python objects other than tensors; refusing to unpickle it "
                              f"({first_line(e)})") from None
    except Exception as e:  # truncated zip, not a torch file at all, ...
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({first_line(e)})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj



# -- strict loading ------------------------------------------------------------------------
def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load `state` into `model`; any missing/unexpected key or shape mismatch is one error line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, tuple(own[k].shape), tuple(state[k].shape))
              for k in own if k in state and own[k].shape != state[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys ({_few(missing)})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys ({_few(unexpected)})")
    if shapes:
        k, want, got = shapes[0]
        problems.append(f"{len(shapes)} shape mismatches (first {k}: expected {want}, found {got})")
    if problems:
        name = getattr(model.config, "name", type(model).__name__)
        raise CheckpointError(f"{source} does not fit {name}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    return model



def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
