"""Ratio floors of the benchmarks: the device classes, the committed table (floors.csv) and the
check of a measured ratio against it.

A benchmark's ratio is the reference's time over ours (higher = faster). floors.csv holds one
row per benchmark (its pytest id under benchmarks/) and one column per device class; a cell is
the lowest ratio accepted on that class, or ``not measured``. Floors are ratios, not times, so
one floor holds across the machines of a class.

Run as a script, it proposes a class's floors from run summaries (the JSON each
``pytest benchmarks/`` run writes): the lowest ratio of each benchmark over the runs times a
margin for noise::

    python benchmarks/floors.py propose RUN1.json RUN2.json ... [--margin 0.8] [--write]
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
from pathlib import Path

import torch

TABLE = Path(__file__).with_name("floors.csv")
CLASSES = ("cpu", "cpu-bf16", "cuda")
NOT_MEASURED = "not measured"
DESCRIPTIONS = {
    "cpu": "CPU without native bf16 (no AVX512-BF16 or AMX-BF16)",
    "cpu-bf16": "CPU with native bf16 (AVX512-BF16 or AMX-BF16)",
    "cuda": "CUDA GPU",
}


def cpu_bf16_flags() -> list[str]:
    """The bf16 instruction sets of this CPU, as /proc/cpuinfo names them (torch's own probe
    where there is no /proc/cpuinfo)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        caps = torch.cpu.get_capabilities()
        return [name for name in ("avx512_bf16", "amx_bf16") if caps.get(name)]
    return [name for name in ("avx512_bf16", "amx_bf16") if name in flags]


def device_class() -> str:
    """The device class of this machine: cuda where a GPU is visible, cpu-bf16 where the CPU
    has native bf16, else cpu. ADDP_BENCH_CLASS overrides it."""
    forced = os.environ.get("ADDP_BENCH_CLASS")
    if forced:
        if forced not in CLASSES:
            raise ValueError(f"ADDP_BENCH_CLASS={forced!r}: expected one of {', '.join(CLASSES)}")
        return forced
    if torch.cuda.is_available():
        return "cuda"
    return "cpu-bf16" if cpu_bf16_flags() else "cpu"


def load(path: Path = TABLE) -> dict[str, dict[str, float | None]]:
    """{benchmark: {class: floor or None (not measured)}} from a floors table; '#' lines are
    comments."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(line for line in f if line.strip() and not line.startswith("#")))
    table = {}
    for row in rows:
        name = row.pop("benchmark").strip()
        unknown = set(row) - set(CLASSES)
        if unknown:
            raise ValueError(f"{path}: unknown device class column(s) {sorted(unknown)}")
        table[name] = {cls: _cell(path, name, cls, row.get(cls)) for cls in CLASSES}
    return table


def _cell(path, name, cls, text) -> float | None:
    text = (text or NOT_MEASURED).strip()
    if text == NOT_MEASURED:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{path}: {name} / {cls}: {text!r} is neither a ratio nor {NOT_MEASURED!r}") from None
    if not value > 0:
        raise ValueError(f"{path}: {name} / {cls}: a floor must be > 0, got {text}")
    return value


def check(benchmark: str, ratio: float, floor: float | None, cls: str, table: Path = TABLE) -> tuple[str, str]:
    """(status, one-line reason): "pass", "fail" (below the floor) or "no floor"."""
    if floor is None:
        return "no floor", f"{benchmark}: {ratio:.2f}x, no floor for class {cls} in {table.name}"
    if ratio >= floor:
        return "pass", f"{benchmark}: {ratio:.2f}x >= floor {floor:.2f}x"
    return "fail", f"{benchmark}: ratio {ratio:.2f}x is below its floor {floor:.2f}x (class {cls}, {table.name})"


# --------------------------------------------------------------------------- proposing floors
def propose(summaries: list[dict], margin: float) -> tuple[str, dict[str, dict]]:
    """(class, {benchmark: {"floor", "min", "median", "runs"}}) from run summaries of one class."""
    classes = {s["machine"]["class"] for s in summaries}
    if len(classes) != 1:
        raise ValueError(f"the summaries come from several device classes: {sorted(classes)}")
    if any(s.get("smoke") for s in summaries):
        raise ValueError("a --smoke run's ratios are not timings: give summaries of full runs")
    seen: dict[str, list[float]] = {}
    for summary in summaries:
        for entry in summary["ratios"]:
            if not entry["study"]:
                seen.setdefault(entry["benchmark"], []).append(entry["ratio"])
    out = {}
    for name, ratios in sorted(seen.items()):
        ratios.sort()
        out[name] = {"floor": math.floor(ratios[0] * margin * 100) / 100, "min": ratios[0],
                     "median": ratios[len(ratios) // 2], "runs": len(ratios)}
    return classes.pop(), out


def write(table: dict, path: Path = TABLE) -> None:
    """Write ``table`` ({benchmark: {class: floor or None}}) keeping the file's comment lines."""
    comments = [line for line in path.read_text().splitlines(keepends=True) if line.startswith("#")] \
        if path.exists() else []
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        f.writelines(comments)
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["benchmark", *CLASSES])
        for name in sorted(table):
            writer.writerow([name, *(NOT_MEASURED if table[name].get(c) is None else f"{table[name][c]:.2f}"
                                     for c in CLASSES)])
    tmp.replace(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("propose", help="floors of one class from run summaries (min ratio x margin)")
    p.add_argument("summaries", nargs="+", type=Path)
    p.add_argument("--margin", type=float, default=0.8)
    p.add_argument("--write", action="store_true", help=f"set the class's column of {TABLE.name}")
    args = parser.parse_args(argv)
    cls, proposed = propose([json.loads(s.read_text()) for s in args.summaries], args.margin)
    print(f"| benchmark | runs | min | median | floor ({cls}, min x {args.margin}) |\n|---|---|---|---|---|")
    for name, p in proposed.items():
        print(f"| {name} | {p['runs']} | {p['min']:.2f} | {p['median']:.2f} | {p['floor']:.2f} |")
    if args.write:
        table = load() if TABLE.exists() else {}
        for name, p in proposed.items():
            table.setdefault(name, {c: None for c in CLASSES})[cls] = p["floor"]
        write(table)
        print(f"wrote the {cls} column of {TABLE}")


if __name__ == "__main__":
    main()
