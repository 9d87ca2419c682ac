"""One writer per output folder: an advisory lock on the folder, held for the length of a run.

The lock is ``flock`` on the folder itself, so taking it writes nothing: a refused or failed
run leaves the folder as it was. The kernel releases it when its process ends, however it
ends, so a killed run never leaves a stale lock. A refused run names the holder's pid, read
from /proc/locks where the system has it.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import AddpError
from .files import make_folder, remove_stale_temp_files


class FolderLock:
    def __init__(self, folder):
        self.folder = Path(folder)
        self._fd = None

    def acquire(self) -> "FolderLock":
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = _holder(self.folder)
            who = f"process {pid}" if pid else "another process"
            raise AddpError(f"{self.folder} is in use by {who}; wait for it to end or use another output folder") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(folder: Path) -> int | None:
    """The pid holding a flock on ``folder``, from /proc/locks (Linux); None when unknown."""
    try:
        inode = os.stat(folder).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].split(":")[-1] == str(inode):
            return int(fields[4])
    return None


def lock_run_folder(out, is_main: bool, folders=()) -> FolderLock | None:
    """On rank 0: make the run folder `out`, take its lock (a second run into it is refused in
    one line naming the holder), then remove the temporary files a killed run of ours left in
    `out` and `folders`. Other ranks: None (rank 0 writes the folder)."""
    if not is_main:
        return None
    lock = FolderLock(make_folder(out)).acquire()
    for folder in [Path(out), *map(Path, folders)]:
        remove_stale_temp_files(folder)
    return lock
