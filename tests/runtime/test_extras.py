"""Optional parts: every one is an extra of the package, and a missing one is one line naming it."""
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from addp.errors import AddpError
from addp.runtime.extras import EXTRAS, require

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def without(module: str, command: str, argv: list) -> subprocess.CompletedProcess:
    """`python -m command *argv` in a process where `module` cannot be imported (as if not installed)."""
    code = (f"import runpy, sys; sys.modules[{module!r}] = None; sys.argv = [{command!r}, *{argv!r}]; "
            f"runpy.run_module({command!r}, run_name='__main__', alter_sys=True)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_every_optional_module_has_its_declared_extra():
    extras = PYPROJECT["project"]["optional-dependencies"]
    for module, (dist, extra) in EXTRAS.items():
        assert dist in extras[extra], (module, extra)
    assert set(extras["all"]) == {f"addp[{e}]" for e in extras if e not in ("test", "all")}
    assert {extra for _, extra in EXTRAS.values()} <= set(extras) - {"test", "all"}


def test_build_requirements_bound_torch_and_bring_ninja():
    requires = PYPROJECT["build-system"]["requires"]
    assert "ninja" in requires
    torch_req = next(r for r in requires if r.startswith("torch"))
    assert ">=" in torch_req and "<" in torch_req.replace("<=", "<")
    installs = [line for line in (ROOT / "README.md").read_text().splitlines() if "pip install torch" in line]
    assert installs and all("ninja" in line for line in installs)  # the --no-build-isolation build uses it


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    with pytest.raises(AddpError, match=r'^ONNX export needs onnxscript, which is not installed: '
                                        r'pip install "addp\[onnx\]"$'):
        require("onnxscript", "ONNX export")


def test_evaluate_without_torch_fidelity_is_one_line():
    proc = without("torch_fidelity", "addp.evaluate", ["--samples", "digits", "--reference", "digits"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        'error: computing FID, KID, IS or precision/recall needs torch-fidelity, which is not installed: '
        'pip install "addp[metrics]"']


def test_onnx_export_without_onnxscript_is_one_line(tiny_checkpoint, tmp_path):
    proc = without("onnxscript", "addp.export", ["--checkpoint", str(tiny_checkpoint), "--format", "onnx",
                                                 "--output", str(tmp_path / "m.onnx")])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        'error: ONNX export needs onnxscript, which is not installed: pip install "addp[onnx]"')
    assert not (tmp_path / "m.onnx").exists()
