"""Writing files safely: atomic replacement, and checks that an output can be written
before any work starts (they create nothing)."""
from __future__ import annotations

import hashlib

import json
import math
import os
import re
import secrets
import stat
import string
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..errors import AddpError


# The temporary files of this package: ".addp-<target>.<writer pid>.<8 random chars>.tmp". Only
# names of this pattern are ever cleaned up, and only by a run that holds the folder's lock.
TEMP_PREFIX = ".addp-"
_TEMP_NAME = re.compile(r"\.addp-(?P<target>.+)\.(?P<pid>\d+)\.[a-z0-9]{8}\.tmp")
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _token() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def new_temp_file(folder: str | os.PathLike, name: str) -> tuple[Path, os.stat_result]:
    """Create an empty temporary file for `name` in `folder` (never through a symlink, never an
    existing file; mode 0666 less the umask). Returns its path and identity (for `_still_ours`)."""
    folder = Path(folder)
    for _ in range(100):
        tmp = folder / f"{TEMP_PREFIX}{name}.{os.getpid()}.{_token()}.tmp"
        try:
            fd = os.open(tmp, _CREATE, 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            raise AddpError(f"cannot write in {folder}: {e.strerror or e}") from None
        try:
            return tmp, os.fstat(fd)
        finally:
            os.close(fd)
    raise AddpError(f"cannot create a temporary file in {folder}")


def _still_ours(tmp: Path, made: os.stat_result) -> bool:
    """Whether `tmp` is still a regular file on the device `new_temp_file` made it on (writers
    such as safetensors recreate the file, so its inode may change; a symlink is never ours)."""
    try:
        now = os.lstat(tmp)
    except OSError:
        return False
    return stat.S_ISREG(now.st_mode) and now.st_dev == made.st_dev


def make_folder(path: str | os.PathLike) -> Path:
    """`mkdir -p` (mode 0777 less the umask); one error line when it cannot be made."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise AddpError(f"cannot make folder {path}: a file of that name exists") from None
    except OSError as e:
        raise AddpError(f"cannot make folder {path}: {e.strerror or e}") from None
    return path


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call `write(tmp_path)` then rename the finished file onto `path`.

    The temporary file is created by us (never through a symlink) with the umask's mode, and
    checked to still be that file before the rename; a symlink at `path` is replaced, never
    followed. A full disk or another write failure is one `AddpError` line."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise AddpError(f"{path} is a folder; give the path of a file")
    make_folder(path.parent)
    tmp, made = new_temp_file(path.parent, path.name)
    try:
        write(str(tmp))
        if not _still_ours(tmp, made):
            raise AddpError(f"{tmp} was replaced while it was written; not renaming it onto {path}")
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        if _still_ours(tmp, made):
            tmp.unlink(missing_ok=True)
        if _is_write_failure(e):
            raise AddpError(f"cannot write {path}: {_reason(e)}") from None
        raise
    return path


def _is_write_failure(e: BaseException) -> bool:
    """torch.save and safetensors report a failed write (full disk, file size limit, I/O error)
    as a RuntimeError or SafetensorError rather than an OSError."""
    if isinstance(e, OSError):
        return True
    if isinstance(e, torch.OutOfMemoryError):
        return False
    return isinstance(e, (RuntimeError, SafetensorError)) and "can't allocate memory" not in str(e)


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    lines = str(e).strip().splitlines()
    line = lines[0][:200] if lines else type(e).__name__
    return f"the write failed (a full disk or a file size limit?): {line}"


def open_append(path: str | os.PathLike):
    """Open a log file for appending (created with the umask's mode); a symlink is refused, not followed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if os.path.islink(path):
            raise AddpError(f"{path} is a symbolic link; refusing to write through it") from None
        raise AddpError(f"cannot write {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AddpError(f"{path} is not a regular file; refusing to write to it")
    return os.fdopen(fd, "a")


def probe_writable(folder: str | os.PathLike) -> None:
    """Fail in one line unless a file can be created in `folder` (creates and removes one of ours)."""
    tmp, made = new_temp_file(folder, "write-test")
    if _still_ours(tmp, made):
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    """The process's umask (from /proc where it is there: reading it with os.umask sets it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, folder: bool = False) -> None:
    """Give `path` (made by mkstemp/mkdtemp, which make it private) the mode the umask asks for."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files this package left in `folder` when its process was killed
    mid-write: only regular files named by our pattern whose writer process is gone. Call it
    only while holding the folder's lock. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return []
    removed = []
    for p in folder.iterdir():
        m = _TEMP_NAME.fullmatch(p.name)
        if m and p.is_file() and not p.is_symlink() and not _process_alive(int(m.group("pid"))):
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
    """Write `data` as indented, strict JSON with sorted keys (non-finite numbers become null), atomically."""
    text = json.dumps(finite_or_none(data), indent=1, allow_nan=False, sort_keys=True)
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
    """The SHA-256 of a regular file's bytes (hex), read in chunks; a device file or FIFO, which
    would never end or block forever, is one error line."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO opens without a writer
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AddpError(f"{path} is not a regular file (a device, FIFO or socket); refusing to read it")
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """`sha256_file` of a file; of a folder (a save_pretrained checkpoint), one SHA-256 over the
    relative names and SHA-256s of every file below it."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    lines = [f"{p.relative_to(path).as_posix()}\0{sha256_file(p)}\n"
             for p in sorted(path.rglob("*")) if p.is_file() or p.is_symlink()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()
