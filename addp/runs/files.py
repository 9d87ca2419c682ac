"""Writing files safely: atomic replacement, and checks that an output can be written
before any work starts (they create nothing)."""
from __future__ import annotations

import hashlib

import json
import math
import os
import re
import tempfile
from pathlib import Path

from ..errors import AddpError


# what `atomic_write` names its temporary files: ".<target>.<writer pid>.<random>.tmp"
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.(?P<pid>\d+)\.[a-z0-9_]+\.tmp")


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call `write(tmp_path)` then rename the finished file onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
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


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files `atomic_write` left in `folder` when its process was killed
    mid-write (only names of our pattern whose writer process is gone). Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        m = _TEMP_NAME.fullmatch(p.name)
        if m and p.is_file() and not _process_alive(int(m.group("pid"))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except OSError:
        return False
    return True


def finite_or_none(obj):
    """`obj` with every NaN/Inf float replaced by None (JSON has no non-finite numbers)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, data) -> Path:
    """Write `data` as indented, strict JSON (non-finite numbers become null), atomically."""
    text = json.dumps(finite_or_none(data), indent=1, allow_nan=False)
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


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
