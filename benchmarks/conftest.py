"""What every benchmark suite shares (``pytest benchmarks/``): the default selection and the
opt-in studies, the ratio floors that fail a regression, the run's JSON summary and the CI
smoke mode.

Options (``pytest benchmarks/ --help`` lists them under "addp benchmarks"):
  --studies         also run the long studies (tests marked ``study``); ``-m study`` runs only
                    them; a file or test named on the command line runs whatever it holds
  --smoke           one tiny round of each selected benchmark, benchmarks' timers off, no
                    floor checked: does the suite still run (CI)
  --floors PATH     the ratio floors table (default benchmarks/floors.csv)
  --ratio-json PATH the run's summary (default benchmarks/results/runs/<time>-<class>.json)
Environment: ADDP_BENCH_SLOW_OURS=PATTERN[:FACTOR] makes "ours" FACTOR (default 10) times
slower in the benchmarks whose id matches PATTERN (a glob or a substring): a regression on
purpose, to see the floors catch it; ADDP_BENCH_CLASS forces the device class (floors.py).
"""
from __future__ import annotations

import fnmatch
import json
import os
import platform
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import floors as F  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "runs"
_RUN = None  # this session's Run (pytest_runtest_logreport gets no config)


SHAPE_VARIABLES = ("ADDP_BENCH_BATCH", "ADDP_BENCH_STEPS")  # benchmarks/presets.py


class Run:
    """What one session measured: the ratios (with their floors and status) and each test's outcome."""

    def __init__(self, config):
        self.smoke = config.getoption("smoke")
        self.floors_path = Path(config.getoption("floors"))
        self.floors = F.load(self.floors_path)
        self.device_class = F.device_class()
        self.ratios: list[dict] = []
        self.outcomes: dict[str, dict] = {}  # test id -> {"outcome", "seconds"}
        self.started = time.time()
        self.load_at_start = os.getloadavg()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(self.started))
        self.json_path = Path(config.getoption("ratio_json") or RESULTS / f"{stamp}-{self.device_class}.json")

    def add(self, item, name: str, ratio: float, detail: str, part: str | None) -> dict:
        if part is None and any(r["test"] == item.nodeid for r in self.ratios):
            part = name  # a test's second ratio and on
        key = benchmark_id(item) + (f" {part}" if part else "")
        floor = self.floors.get(key, {}).get(self.device_class)
        reshaped = [v for v in SHAPE_VARIABLES if os.environ.get(v)]
        if self.smoke:
            status, reason = "not checked", f"{key}: {ratio:.2f}x, --smoke (not a timing)"
        elif reshaped:  # the floors hold at the default shapes only
            status, reason = "not checked", f"{key}: {ratio:.2f}x, shapes set by {', '.join(reshaped)}"
        else:
            status, reason = F.check(key, ratio, floor, self.device_class, self.floors_path)
        entry = {"benchmark": key, "name": name, "ratio": ratio, "floor": floor, "status": status,
                 "reason": reason, "detail": detail, "study": item.get_closest_marker("study") is not None,
                 "test": item.nodeid}
        self.ratios.append(entry)
        return entry

    def summary(self, exitstatus) -> dict:
        counts = {}
        for test in self.outcomes.values():
            counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
        return {"command": sys.argv, "started": _iso(self.started), "seconds": round(time.time() - self.started, 1),
                "exit_status": int(exitstatus), "smoke": self.smoke, "floors_table": str(self.floors_path),
                "machine": machine(self.device_class, self.load_at_start), "tests": counts,
                "outcomes": self.outcomes, "ratios": self.ratios}

    def write(self, exitstatus) -> None:
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_name(self.json_path.name + ".tmp")
        tmp.write_text(json.dumps(self.summary(exitstatus), indent=1) + "\n")
        tmp.replace(self.json_path)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def benchmark_id(item) -> str:
    """A test's id under benchmarks/ (file::name[params]): the key of its row in floors.csv."""
    return f"{Path(item.path).name}::{item.name}"


def machine(device_class: str, load_at_start) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
               platform.processor())
    return {"class": device_class, "class_description": F.DESCRIPTIONS[device_class], "cpu": cpu,
            "cpu_bf16_flags": F.cpu_bf16_flags(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


# --------------------------------------------------------------------------- options, selection
def pytest_addoption(parser):
    group = parser.getgroup("addp benchmarks")
    group.addoption("--studies", action="store_true", help="also run the long studies (marker: study)")
    group.addoption("--smoke", action="store_true",
                    help="one tiny round of each benchmark, no timing checked (CI: does the suite run)")
    group.addoption("--floors", default=str(F.TABLE), help="ratio floors table (default: %(default)s)")
    group.addoption("--ratio-json", default=None,
                    help="the run's JSON summary (default: benchmarks/results/runs/<time>-<class>.json)")


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark reads --benchmark-disable
def pytest_configure(config):
    config.addinivalue_line("markers", "study: a long study, run with --studies or -m study "
                                       "(or by naming its file); not in the default selection")
    if config.getoption("smoke"):
        os.environ["ADDP_BENCH_SMOKE"] = "1"
        os.environ.setdefault("ADDP_BENCH_ROUNDS", "1")
        os.environ.setdefault("ADDP_BENCH_STEPS", "2")
        config.option.benchmark_disable = True
    global _RUN
    config._addp_bench = _RUN = Run(config)


def pytest_collection_modifyitems(config, items):
    """Deselect the studies unless asked for: --studies, a -m expression, or their file named."""
    if config.getoption("studies") or config.option.markexpr:
        return
    named = set()
    for arg in config.args:
        path = Path(config.invocation_params.dir, arg.split("::")[0]).resolve()
        if path.is_file():
            named.add(path)
    studies = [i for i in items if i.get_closest_marker("study") and Path(i.path).resolve() not in named]
    if studies:
        config.hook.pytest_deselected(items=studies)
        items[:] = [i for i in items if i not in set(studies)]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def report_ratio(request):
    """report_ratio(name, ratio, detail="", part=None): record ``ratio`` (reference time / ours,
    higher = faster) for the summary and its floor check, as benchmark "<test id>" or, for a
    test's further ratios, "<test id> <part>" (default part: ``name``)."""
    run = request.config._addp_bench

    def add(name, ratio, detail="", part=None):
        run.add(request.node, name, float(ratio), detail, part)
    return add


@pytest.fixture
def slow_ours(request):
    """slow_ours(fn) -> fn, or fn made FACTOR times slower (a sleep after each call) where
    ADDP_BENCH_SLOW_OURS=PATTERN[:FACTOR] matches this benchmark's id."""
    spec = os.environ.get("ADDP_BENCH_SLOW_OURS", "")
    pattern, _, factor = spec.partition(":")
    test_id = benchmark_id(request.node)
    if not pattern or not (pattern in test_id or fnmatch.fnmatch(test_id, pattern)):
        return lambda fn: fn
    factor = float(factor or 10)

    def slowed(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            time.sleep((factor - 1) * (time.perf_counter() - start))
            return out
        return run
    return slowed


# --------------------------------------------------------------------------- floors, summary
@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    """Fail a benchmark whose ratio fell below its floor, with one line per ratio."""
    result = yield
    run = pyfuncitem.config._addp_bench
    below = [r["reason"] for r in run.ratios if r["test"] == pyfuncitem.nodeid and r["status"] == "fail"]
    if below:
        pytest.fail("; ".join(below), pytrace=False)
    return result


def pytest_runtest_logreport(report):
    if report.when == "call":
        _RUN.outcomes[report.nodeid] = {"outcome": report.outcome, "seconds": round(report.duration, 1)}
    elif report.outcome != "passed":  # skipped at setup, or an error in setup / teardown
        _RUN.outcomes[report.nodeid] = {"outcome": "skipped" if report.skipped else "error", "seconds": 0.0}


def pytest_sessionfinish(session, exitstatus):
    if not session.config.option.collectonly:
        session.config._addp_bench.write(exitstatus)


def pytest_terminal_summary(terminalreporter, config):
    run = config._addp_bench
    if run.ratios:
        terminalreporter.section(f"speed ratios (reference time / ours), floors of class {run.device_class}")
        for r in run.ratios:
            floor = "" if r["floor"] is None else f"floor {r['floor']:.2f}x: "
            terminalreporter.write_line(f"{r['name']}: {r['ratio']:.2f}x  [{floor}{r['status']}]  {r['detail']}")
        failed = [r["reason"] for r in run.ratios if r["status"] == "fail"]
        for reason in failed:
            terminalreporter.write_line(f"BELOW FLOOR {reason}", red=True)
    if config.option.collectonly:
        return
    terminalreporter.write_line(f"benchmark summary: {run.json_path} ({time.time() - run.started:.0f} s, "
                                f"class {run.device_class})")
