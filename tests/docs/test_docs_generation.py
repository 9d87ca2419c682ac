"""The Python examples of docs/generation.md run as written, on a tiny random network."""
import re
from pathlib import Path

import pytest
import torch

import addp

ROOT = Path(__file__).parents[2]
DOC = ROOT / "docs" / "generation.md"

pytestmark = pytest.mark.usefixtures("one_thread")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def demo_checkpoint(folder: Path) -> None:
    """A tiny random network where the docs' examples expect the main job's output."""
    torch.manual_seed(0)
    addp.save_checkpoint(folder / "output" / "addp_demo" / "addp.safetensors",
                         {"addp": addp.create_model("addp_vit_small"), "tokenizer": addp.create_model("vqgan_small")})


def test_readme_example_runs(tmp_path, monkeypatch):
    (block,) = python_blocks((ROOT / "README.md").read_text())
    demo_checkpoint(tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    exec(compile(block, "README.md", "exec"), namespace)
    images = namespace["images"]
    assert len(images) == 16 and images[0].size == (32, 32)  # PIL images of the model's size


def test_examples_of_generation_md_run(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 4
    demo_checkpoint(tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "docs_generation"}
    for block in blocks:  # one namespace: later blocks use what earlier ones made
        exec(compile(block, str(DOC), "exec"), namespace)
    assert (tmp_path / "sample.png").exists()
    printed = capsys.readouterr().out.splitlines()
    assert sum("positions unreliable" in line for line in printed) == 8  # the callback saw every step
