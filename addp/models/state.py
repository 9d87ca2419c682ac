"""State dicts in files: the tensors of a safetensors or torch file read safely (never unpickling
objects), refused when not finite, and loaded strictly into a model with one-line errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError
from .weights_io import check_tensors, read_tensors


# -- reading raw files ---------------------------------------------------------------------
def read_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Tensors of a checkpoint file (checked by `weights_io.read_tensors`) and, for our format,
    its component description."""
    tensors, metadata = read_tensors(path)
    if Path(path).suffix != ".safetensors":
        return tensors, None
    if "addp_components" not in metadata:
        raise CheckpointError(f"{path} is a safetensors file without an addp component description")
    try:
        components = json.loads(metadata["addp_components"])
    except ValueError:
        components = None
    if not isinstance(components, dict) or not all(isinstance(c, dict) for c in components.values()):
        raise CheckpointError(f"{path}: its addp component description is not a JSON object of configs")
    return tensors, components


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights that are not tensors or hold NaN or Inf, naming the first such tensor."""
    check_tensors(tensors, source)


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
