"""Reading and writing weight files: the one path every loader of the package goes through.

Every source of weights (a checkpoint file, a save_pretrained folder, a Hub download, timm's
`pretrained_cfg_overlay`, the FID feature extractor's weights) is read here, with the same
checks: only regular files (a device file or FIFO would hang or stream forever), PyTorch
files through `torch.load(weights_only=True)` (a pickled object is never executed),
safetensors through safetensors, only tensors, no NaN or Inf, and file names taken from a
folder's index must stay inside that folder. Every problem is one `CheckpointError` line.

Writing: `save_safetensors` gives byte-identical files for identical tensors and metadata
(safetensors itself writes the metadata in a random key order).
"""
from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, first_line


def check_regular_file(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """`path` if it is an existing regular file (symlinks to one are fine); one error line otherwise."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path} ({first_line(e)})") from None
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"{path} is a folder, not a {what} file")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path} is not a regular file (a device, FIFO or socket); refusing to read it")
    return path


def member(folder: str | os.PathLike, name: str, what: str = "file") -> Path:
    """`folder / name` for a relative `name` that stays inside `folder` (no `..`, no absolute path)."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{folder}: {what} name must be a non-empty string, got {name!r}")
    parts = PurePosixPath(name.replace("\\", "/"))
    if parts.is_absolute() or Path(name).is_absolute() or ".." in parts.parts or (parts.parts and ":" in parts.parts[0]):
        raise CheckpointError(f"{folder}: {what} {name!r} is not a path inside the folder; refusing it")
    return Path(folder) / name


def check_tensors(state, source: str) -> dict[str, torch.Tensor]:
    """`state` if it maps names to tensors with finite values; one error line otherwise."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} does not hold a state dict of tensors (it holds a {type(state).__name__})")
    for name, t in state.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{source} does not hold a state dict of tensors "
                                  f"(entry {str(name)[:80]!r} is a {type(t).__name__})")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{source}: tensor {name} holds non-finite values (NaN or Inf); refusing to load it")
    return state


def read_tensors(path: str | os.PathLike, what: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict]:
    """The checked tensors of a weights file and its safetensors metadata (empty for PyTorch files).

    A PyTorch file's state dict may sit under a `model` or `state_dict` key (official files)."""
    path = check_regular_file(path, what)
    if path.suffix == ".safetensors":
        tensors, metadata = _read_safetensors(path)
    else:
        tensors, metadata = _read_torch(path), {}
    return check_tensors(tensors, str(path)), metadata


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(e)})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return tensors, metadata if isinstance(metadata, dict) else {}


def _read_torch(path: Path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds Python objects other than tensors; refusing to unpickle it "
                              f"({first_line(e)})") from None
    except MemoryError:
        raise CheckpointError(f"{path}: not enough memory to read it") from None
    except Exception as e:  # truncated zip, not a torch file at all, ...
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({first_line(e)})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, with the metadata in sorted key order so that the same
    tensors and metadata always give the same bytes."""
    save_file(tensors, str(path), metadata=metadata)
    if metadata:
        _sort_metadata(Path(path))


def _sort_metadata(path: Path) -> None:
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
        if len(text) == n:
            f.seek(8)
            f.write(text)
            return
        data = f.read()
        f.seek(0)
        f.write(len(text).to_bytes(8, "little") + text + data)
        f.truncate()
