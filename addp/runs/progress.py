"""Progress that fits where it goes: a tqdm bar on a terminal (or in a notebook), and in a file
or pipe (`> run.log`, a SLURM output file) one plain line per interval with the same numbers:
count, rate, the values the caller reports (loss, lr, images/s) and the time left.

ADDP_PROGRESS=bar|lines|off forces the form; ADDP_PROGRESS_INTERVAL sets the seconds between
plain lines (default 30). Both forms count the rate and the time left from the start of the bar
(tqdm with ``smoothing=0``), so they show the same numbers.
"""
from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm

from ..errors import AddpError

DEFAULT_INTERVAL = 30.0
MODES = ("bar", "lines", "off")


def _mode(file) -> str:
    mode = os.environ.get("ADDP_PROGRESS", "").strip().lower()
    if mode:
        if mode not in MODES:
            raise AddpError(f"ADDP_PROGRESS={mode!r} in the environment is not one of {', '.join(MODES)}")
        return mode
    is_tty = getattr(file, "isatty", lambda: False)()
    return "bar" if is_tty or "ipykernel" in sys.modules else "lines"


def _interval() -> float:
    text = os.environ.get("ADDP_PROGRESS_INTERVAL", "")
    try:
        value = float(text) if text else DEFAULT_INTERVAL
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise AddpError(f"ADDP_PROGRESS_INTERVAL={text!r} in the environment is not a number of seconds >= 0")
    return value


class Progress:
    """The subset of tqdm's interface the package uses: `update`, `set_postfix`, `close`, a
    context manager and iteration. `file` defaults to stderr; `interval` (seconds between plain
    lines) to ADDP_PROGRESS_INTERVAL."""

    def __init__(self, iterable=None, *, total: int | None = None, initial: int = 0, desc: str = "",
                 unit: str = "it", disable: bool = False, file=None, interval: float | None = None,
                 mode: str | None = None):
        self.iterable = iterable
        self.total = len(iterable) if total is None and iterable is not None else total
        self.n, self.initial, self.desc, self.unit = initial, initial, desc, unit
        self.file = sys.stderr if file is None else file
        self.mode = "off" if disable else (mode or _mode(self.file))
        self.interval = _interval() if interval is None else interval
        self.postfix: dict[str, str] = {}
        self.start = self.last_line = time.monotonic()
        self.printed_n = None
        self.bar = None
        if self.mode == "bar":
            self.bar = tqdm(total=self.total, initial=initial, desc=desc, unit=unit, file=self.file,
                            dynamic_ncols=True, smoothing=0)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, **values) -> None:
        """Values shown after the count, e.g. loss=f"{loss:.4f}" (formatted by the caller)."""
        self.postfix = {k: str(v) for k, v in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "lines":
            now = time.monotonic()
            if self.printed_n is None or now - self.last_line >= self.interval or self.n == self.total:
                self._line(now)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "lines" and self.printed_n != self.n:
            self._line(time.monotonic())
        self.mode = "off" if self.mode == "lines" else self.mode

    def line(self, now: float | None = None) -> str:
        """The plain line for the current state: `desc: step 120/6000 (2%) | 3.51 step/s |
        loss 4.1234 | lr 1.50e-04 | img_s 224 | 28:01 elapsed, 0:27:58 left`."""
        elapsed = (time.monotonic() if now is None else now) - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        parts = [f"{self.desc}: {self.unit} {count}" if self.desc else f"{self.unit} {count}",
                 f"{rate:.2f} {self.unit}/s"]
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        left = tqdm.format_interval((self.total - self.n) / rate) if self.total and rate > 0 else "?"
        parts.append(f"{tqdm.format_interval(elapsed)} elapsed, {left} left")
        return " | ".join(parts)

    def _line(self, now: float) -> None:
        print(self.line(now), file=self.file, flush=True)
        self.last_line, self.printed_n = now, self.n
