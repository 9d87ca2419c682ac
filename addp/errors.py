"""The error type of the package (what the user asked for or gave cannot be done) and how a
library's error is quoted in one line."""
from __future__ import annotations



class AddpError(ValueError):
    """An error in what the user asked for or gave; its message is one line."""


def first_line(e: BaseException, limit: int | None = 300) -> str:
    """The first line of an exception's message (at most ``limit`` characters), else its type's
    name: how an error from a library is quoted in one of our one-line messages."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    return text if limit is None else text[:limit]


class CheckpointError(AddpError):
    """A checkpoint that cannot be read or does not fit: missing, unreadable, wrong keys or shapes."""
