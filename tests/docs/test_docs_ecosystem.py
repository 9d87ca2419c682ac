"""docs/ecosystem.md's examples run as written (offline, demo models).

Python blocks run in order in one namespace, in a temporary folder; `python -m addp.export`
lines of bash blocks run through the same entry point in-process. Blocks after a
`<!-- not run: ... -->` comment are skipped (they need the official weights). The repo id
the document uploads to is served from an offline Hub cache holding the folder it saved.
"""
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from addp import export

DOC = Path(__file__).parents[2] / "docs" / "ecosystem.md"
BLOCK = re.compile(r"(<!-- not run[^>]*-->\s*)?```(\w*)\n(.*?)```", re.S)
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None

pytestmark = pytest.mark.usefixtures("one_thread")


def blocks():
    return [(lang, code, bool(skip)) for skip, lang, code in BLOCK.findall(DOC.read_text())]


def test_the_document_has_examples_to_run():
    runnable = [(lang, code) for lang, code, skip in blocks() if not skip and lang in ("python", "bash")]
    assert len(runnable) >= 5 and any("Changyao/ADDP" in code for lang, code, skip in blocks() if skip)


@pytest.mark.slow
def test_examples_run(tmp_path, monkeypatch, hub_cache, modules_cache):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for lang, code, skip in blocks():
        if skip or (not HAS_ONNX and "onnx" in code) or (not HAS_DIFFUSERS and "diffusers" in code):
            continue
        if "your-name/addp-digits" in code:
            hub_cache("your-name/addp-digits", {".": tmp_path / "addp-digits"})
        if lang == "python":
            exec(compile(code, str(DOC), "exec"), namespace)
        elif lang == "bash":
            for line in code.splitlines():
                assert line.startswith("python -m addp.export "), line
                assert export.cli(shlex.split(line)[3:]) == 0, line
    assert namespace["features"].shape[0] == 5
    assert namespace["pipe"].net.config.name == "addp_vit_small"
