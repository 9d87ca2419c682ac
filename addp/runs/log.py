"""The training log of a run folder: log.jsonl and TensorBoard scalars, written by rank 0, cut
back to the resumed step so that no step is logged twice."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import AddpError
from .files import atomic_write, finite_or_none, open_append


class RunLog:
    """JSONL + TensorBoard scalars, written by rank 0 only. Entries past `start_step` (written
    after the checkpoint being resumed) are dropped first, so no step is logged twice."""

    def __init__(self, out: Path, enabled: bool, start_step: int):
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            out.mkdir(parents=True, exist_ok=True)
            _truncate_log(out / "log.jsonl", start_step)
            self.jsonl = open_append(out / "log.jsonl")
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(finite_or_none({"step": step, **values})) + "\n")
        self.jsonl.flush()
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled and not self.jsonl.closed:
            self.jsonl.close()
            self.tb.close()



def _truncate_log(path: Path, last_step: int) -> None:
    """Keep the JSONL entries up to `last_step` (and drop a line cut short by a kill)."""
    if path.is_symlink():
        raise AddpError(f"{path} is a symbolic link; refusing to write through it")
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= last_step:
            kept.append(line + "\n")
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))
