"""benchmarks/gpu_check.sh refuses bad arguments with one line and exit status 2, before any step."""
import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


def run(*args, cwd=None):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30, cwd=cwd)


@pytest.mark.parametrize("args,message", [
    (["--fast"], "unknown argument '--fast'"),
    (["--budget", "ten"], "whole number of seconds"),
    (["--budget", "60"], "too small for the correctness steps"),
    (["--out"], "--out needs a folder"),
])
def test_bad_arguments_are_one_line_errors(args, message, tmp_path):
    proc = run(*args, "--out", str(tmp_path / "out")) if args != ["--out"] else run(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert proc.stdout == ""
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_folder_is_one_line_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    proc = run("--out", str(locked / "results"), "--dry-run")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "cannot write" in proc.stderr


def test_output_path_under_a_file_is_one_line_error(tmp_path):
    """A folder that cannot be made (a plain file is in its path): refused, even for root."""
    (tmp_path / "file").write_text("x")
    proc = run("--out", str(tmp_path / "file" / "results"), "--dry-run")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "cannot write to the output folder" in lines[0]


def test_help_prints_the_usage():
    proc = run("--help")
    assert proc.returncode == 0 and "--with-compile" in proc.stdout
