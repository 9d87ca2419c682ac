"""What a training run folder holds, and how a cached stage output is matched to a command.

Each stage output (`tokenizer.safetensors`, `predictor.safetensors`, `addp.safetensors`) has a
record, `<stage>/output.json`: the SHA-256 of the file and the stage's identity — its
training and model config plus the SHA-256 of every file it consumed. A pending record
(written before the file, replaced after it) marks an output whose writing was cut short. A cached output is
reused only when its record matches what the current command would make, byte for byte.
See docs/run-folders.md.
"""
from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_write, sha256_file

RECORD = "output.json"


def differing_keys(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def describe_differences(recorded: dict, current: dict, limit: int = 4) -> str:
    """`key: recorded -> current, ...` over the keys that differ (hashes shortened)."""
    def show(v):
        if isinstance(v, str) and len(v) == 64:
            return v[:12]
        return "unset" if v is None else json.dumps(v)
    keys = differing_keys(recorded, current)
    parts = [f"{k}: {show(recorded.get(k))} -> {show(current.get(k))}" for k in keys[:limit]]
    return ", ".join(parts) + (f", and {len(keys) - limit} more" if len(keys) > limit else "")


def record_path(out: Path, stage: str) -> Path:
    return Path(out) / stage / RECORD


def read_record(out: Path, stage: str) -> dict | None:
    """The record of a stage's output, or None when it is missing or unreadable."""
    try:
        record = json.loads(record_path(out, stage).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("identity"), dict)
    ok = ok and (isinstance(record.get("sha256"), str) or (record.get("pending") is True and record["sha256"] is None))
    return record if ok else None


def write_pending_record(out: Path, stage: str, file: Path, identity: dict) -> None:
    """Record, before `file` is written, that this identity's output is being written: a run
    killed before `write_record` leaves a file its own command recognises and writes again."""
    _write(out, stage, {"file": Path(file).name, "sha256": None, "pending": True, "identity": identity})


def write_record(out: Path, stage: str, file: Path, identity: dict) -> str:
    """Record what `file` was made from; returns its SHA-256."""
    sha = sha256_file(file)
    _write(out, stage, {"file": Path(file).name, "sha256": sha, "identity": identity})
    return sha


def _write(out: Path, stage: str, record: dict) -> None:
    text = json.dumps(record, indent=1, sort_keys=True)
    atomic_write(record_path(out, stage), lambda tmp: Path(tmp).write_text(text))


def compare_output(out: Path, stage: str, file: Path, identity: dict) -> tuple[str | None, str | None]:
    """(sha256, None) when `file` was made from exactly `identity`; (None, None) when there is
    no such file; (None, reason) when it was made from something else (or nothing says)."""
    if not Path(file).exists():
        return None, None
    record = read_record(out, stage)
    if record is None:
        return None, f"has no record of what it was made from ({record_path(out, stage)})"
    if record.get("pending") and not differing_keys(record["identity"], identity):
        return None, None  # this command's own write, stopped before its record: make it again
    if record.get("pending"):
        return None, (f"was being made from something else when its run stopped "
                      f"({describe_differences(record['identity'], identity)})")
    sha = sha256_file(file)
    if sha != record["sha256"]:
        return None, "was changed after it was made (its SHA-256 differs from its record)"
    if differing_keys(record["identity"], identity):
        return None, f"was made from something else ({describe_differences(record['identity'], identity)})"
    return sha, None


def check_inputs(out: Path, stage: str, file: Path, inputs: dict) -> str | None:
    """Why the cached `file` of `stage` may not be used with `inputs` (e.g. the tokenizer's
    SHA-256 it was trained against), or None when it may."""
    record = read_record(out, stage)
    if record is None:
        return f"has no record of what it was made from ({record_path(out, stage)})"
    if record.get("pending"):
        return "was not finished (its run stopped while writing it)"
    if sha256_file(file) != record["sha256"]:
        return "was changed after it was made (its SHA-256 differs from its record)"
    recorded = {k: record["identity"].get(k) for k in inputs}
    if differing_keys(recorded, inputs):
        return f"was trained against other inputs ({describe_differences(recorded, inputs)})"
    return None
