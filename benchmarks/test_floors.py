"""The regression check itself: the device class, the floors table, the selection of studies, and
a benchmark slowed on purpose (ADDP_BENCH_SLOW_OURS) failing its floor with one line while the
same benchmark unslowed passes, its JSON summary written either way. The pytest runs under test
are subprocesses on one small op benchmark (seconds)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import floors as F  # noqa: E402
from addp.ops import has_compiled_ops  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parent
OWN_ENV = ("ADDP_BENCH_SMOKE", "ADDP_BENCH_ROUNDS", "ADDP_BENCH_STEPS", "ADDP_BENCH_SLOW_OURS", "ADDP_BENCH_CLASS")
CE = "test_bench_ops.py::test_bench_soft_target_cross_entropy_cpu"  # 3-4x its reference on the CPUs measured


def _pytest(*args, env=None, timeout=300):
    clean = {k: v for k, v in os.environ.items() if k not in OWN_ENV}
    clean["COLUMNS"] = "1000"  # pytest's short summary keeps the whole failure line
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env={**clean, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def test_device_class_agrees_with_torch_probe(monkeypatch):
    monkeypatch.delenv("ADDP_BENCH_CLASS", raising=False)
    caps = torch.cpu.get_capabilities()
    expected = ("cuda" if torch.cuda.is_available()
                else "cpu-bf16" if caps.get("avx512_bf16") or caps.get("amx_bf16") else "cpu")
    assert F.device_class() == expected
    monkeypatch.setenv("ADDP_BENCH_CLASS", "cuda")
    assert F.device_class() == "cuda"
    monkeypatch.setenv("ADDP_BENCH_CLASS", "tpu")
    with pytest.raises(ValueError, match="expected one of cpu, cpu-bf16, cuda"):
        F.device_class()


def test_committed_floors_name_existing_benchmarks():
    table = F.load()
    for name, per_class in table.items():
        test_id = name.split(" ")[0]
        file, _, test = test_id.partition("::")
        source = (HERE / file).read_text()
        assert f"def {test.split('[')[0]}(" in source, f"{F.TABLE.name}: {name} names no benchmark"
        assert all(v is None or 0 < v < 100 for v in per_class.values()), name


def test_committed_floors_of_this_class_are_collected():
    """Every floor of this machine's class names a test that a --studies run collects."""
    cls = F.device_class()
    wanted = {name.split(" ")[0] for name, per_class in F.load().items() if per_class[cls] is not None}
    if not wanted:
        pytest.skip(f"no floors for class {cls}")
    out = _pytest("--collect-only", "-q", "--studies", "benchmarks/")
    collected = {line.removeprefix("benchmarks/") for line in out.stdout.splitlines() if "::" in line}
    assert wanted <= collected, f"floors without a collected test: {sorted(wanted - collected)}"


def test_load_and_check(tmp_path):
    table = tmp_path / "floors.csv"
    table.write_text("# a comment\nbenchmark,cpu,cpu-bf16,cuda\nt.py::a,1.50,not measured,\n")
    assert F.load(table) == {"t.py::a": {"cpu": 1.5, "cpu-bf16": None, "cuda": None}}
    assert F.check("t.py::a", 2.0, 1.5, "cpu")[0] == "pass"
    assert F.check("t.py::a", 2.0, None, "cpu")[0] == "no floor"
    status, reason = F.check("t.py::a", 1.2, 1.5, "cpu", table)
    assert status == "fail" and reason == "t.py::a: ratio 1.20x is below its floor 1.50x (class cpu, floors.csv)"
    table.write_text("benchmark,cpu,gpu\nt.py::a,1,2\n")
    with pytest.raises(ValueError, match="unknown device class"):
        F.load(table)
    table.write_text("benchmark,cpu\nt.py::a,fast\n")
    with pytest.raises(ValueError, match="neither a ratio nor 'not measured'"):
        F.load(table)


def test_propose_takes_the_lowest_ratio_times_the_margin():
    def run(*ratios):
        return {"smoke": False, "machine": {"class": "cpu"},
                "ratios": [{"benchmark": f"t.py::{i}", "ratio": r, "study": False} for i, r in enumerate(ratios)]}
    cls, proposed = F.propose([run(2.0, 5.0), run(1.5, 6.0), run(1.8, 5.5)], margin=0.8)
    assert cls == "cpu"
    assert {k: v["floor"] for k, v in proposed.items()} == {"t.py::0": 1.2, "t.py::1": 4.0}
    with pytest.raises(ValueError, match="several device classes"):
        F.propose([run(1.0), {**run(1.0), "machine": {"class": "cuda"}}], 0.8)


def test_studies_run_only_when_asked():
    def collected(*args):
        out = _pytest("--collect-only", "-q", *args)
        return {line.split("::")[1].split("[")[0] for line in out.stdout.splitlines() if "::" in line}
    default = collected("benchmarks/")
    assert "test_bench_codebook_weighted_sum_cpu" in default and "test_breakdown_generation_step" not in default
    studies = collected("benchmarks/", "-m", "study")
    assert {"test_breakdown_generation_step", "test_bench_vq", "test_bench_compiled_training_steps"} <= studies
    assert "test_bench_codebook_weighted_sum_cpu" not in studies
    assert "test_breakdown_training_step" in collected("benchmarks/test_bench_breakdown.py")


@pytest.mark.skipif(not has_compiled_ops(), reason="addp._C is not built")
def test_slowed_op_fails_its_floor_with_one_line(tmp_path):
    cls = F.device_class()
    table = tmp_path / "floors.csv"
    F.write({CE: {cls: 1.0}}, table)
    args = (f"benchmarks/{CE}", "-q", "--benchmark-disable", "--floors", str(table))
    env = {"ADDP_BENCH_ROUNDS": "5"}

    normal = _pytest(*args, "--ratio-json", str(tmp_path / "normal.json"), env=env)
    assert normal.returncode == 0, normal.stdout[-2000:]
    entry = json.loads((tmp_path / "normal.json").read_text())["ratios"][0]
    assert entry["benchmark"] == CE and entry["status"] == "pass" and entry["ratio"] >= 1.0

    slowed = _pytest(*args, "--ratio-json", str(tmp_path / "slowed.json"),
                     env={**env, "ADDP_BENCH_SLOW_OURS": "soft_target_cross_entropy"})
    assert slowed.returncode == 1, slowed.stdout[-2000:]
    line = next(line for line in slowed.stdout.splitlines() if line.startswith("FAILED"))
    assert re.fullmatch(rf"FAILED benchmarks/{re.escape(CE)} - (Failed: )?{re.escape(CE)}: ratio 0\.\d\dx is below its floor "
                        rf"1\.00x \(class {cls}, floors\.csv\)", line), line
    summary = json.loads((tmp_path / "slowed.json").read_text())
    assert summary["exit_status"] == 1 and summary["outcomes"][f"benchmarks/{CE}"]["outcome"] == "failed"
    assert summary["ratios"][0]["status"] == "fail" and summary["ratios"][0]["floor"] == 1.0
    assert summary["machine"]["class"] == cls


def test_floors_are_not_checked_at_other_shapes(tmp_path):
    """A ratio measured at shapes set by ADDP_BENCH_BATCH / ADDP_BENCH_STEPS (the GPU check's
    rehearsal) is not the benchmark the floor was set for: reported, not checked."""
    table = tmp_path / "floors.csv"
    F.write({CE: {F.device_class(): 1.0}}, table)
    run = _pytest(f"benchmarks/{CE}", "-q", "--benchmark-disable", "--floors", str(table),
                  "--ratio-json", str(tmp_path / "run.json"),
                  env={"ADDP_BENCH_STEPS": "2", "ADDP_BENCH_SLOW_OURS": "soft_target_cross_entropy"})
    assert run.returncode == 0, run.stdout[-2000:]
    entry = json.loads((tmp_path / "run.json").read_text())["ratios"][0]
    assert entry["status"] == "not checked" and "ADDP_BENCH_STEPS" in entry["reason"] and entry["ratio"] < 1.0
