"""Writing files safely: atomic replacement, and checks that an output can be written
before any work starts (they create nothing)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import AddpError


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call `write(tmp_path)` then rename the finished file onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, data) -> Path:
    """Write `data` as indented JSON, atomically."""
    text = json.dumps(data, indent=1)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def check_output_folder(path: str | os.PathLike) -> Path:
    """Fail when the folder `path` cannot be made or written into (nothing is created)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AddpError(f"cannot write to output folder {path}: it is a file")
    _check_creatable(path)
    return path


def check_output_file(path: str | os.PathLike) -> Path:
    """Fail when the file `path` cannot be written (its folder may be missing; nothing is created)."""
    path = Path(path)
    if path.is_dir():
        raise AddpError(f"{path} is a folder; give the path of a file")
    _check_creatable(path.parent)
    return path


def _check_creatable(folder: Path) -> None:
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise AddpError(f"cannot write to output folder {folder}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AddpError(f"cannot write to output folder {folder}: {existing} is not writable")
