"""One writer per output folder: an advisory lock held by the process for the length of a run.

The lock is ``flock`` on a file in the folder: the kernel releases it when its process ends,
however it ends, so a lock file left by a dead process is simply taken over. The file holds
the holder's pid and host, which a refused run names.
"""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from .errors import AddpError

LOCK_NAME = ".lock"


class FolderLock:
    def __init__(self, folder):
        self.path = Path(folder) / LOCK_NAME
        self._fd = None

    def acquire(self) -> "FolderLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise AddpError(f"{self.path.parent} is in use by {holder}; wait for it to end "
                            f"or use another output folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
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
