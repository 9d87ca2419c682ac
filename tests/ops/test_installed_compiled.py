"""A source tree without addp._C (a clone after `pip install .`) runs the installed copy's kernels."""
import importlib.machinery
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILT = [p for s in importlib.machinery.EXTENSION_SUFFIXES for p in (ROOT / "addp").glob(f"_C{s}")]


@pytest.mark.skipif(not BUILT, reason="addp._C is not built in this tree")
def test_source_tree_without_C_uses_the_installed_one(tmp_path):
    clone, site = tmp_path / "clone", tmp_path / "site-packages"
    shutil.copytree(ROOT / "addp", clone / "addp", symlinks=True, ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    shutil.copytree(ROOT / "kernels", clone / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "addp").mkdir(parents=True)
    shutil.copy(BUILT[0], site / "addp" / BUILT[0].name)
    code = "import addp.ops as o, addp.kernels; assert o.has_compiled_ops(); print(o.backends()['dropout'])"
    run = subprocess.run([sys.executable, "-c", code], cwd=clone, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)})
    assert run.returncode == 0 and run.stdout.split() == ["cpu"], run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("addp:")]
    assert lines == [f"addp: running the source tree {clone / 'addp'} with the compiled kernels of the "
                     f"installed copy {site / 'addp'} (it has no addp._C of its own)"], run.stderr
