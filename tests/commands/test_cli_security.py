"""Hostile files in the way of the commands: a pickle payload never runs, a planted symlink is
never written through. Each row: exit code 2 with one `error:` line, or success with the
link's target intact."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PicklePayload

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def samples(tmp_path):
    folder = tmp_path / "samples"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def one_error_line(code, stderr, match):
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], stderr


def test_inception_weights_payload_never_runs(run_module, samples, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "inception.pth"
    torch.save({"fc.weight": PicklePayload(marker)}, evil)
    code, _, stderr = run_module("addp.evaluate", ["--samples", samples, "--reference", samples,
                                                   "--inception-weights", evil, "--metrics", "fid"])
    one_error_line(code, stderr, "other than tensors")
    assert not marker.exists()


def test_payload_at_the_default_cache_path_never_runs(samples, tmp_path):
    from addp.evaluation.extractor_weights import INCEPTION_FILE
    marker = tmp_path / "pwned"
    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save({"fc.weight": PicklePayload(marker)}, home / "hub" / "checkpoints" / INCEPTION_FILE)
    env = {**os.environ, "TORCH_HOME": str(home)}  # torch.hub's cache, read by a fresh process
    done = subprocess.run([sys.executable, "-m", "addp.evaluate", "--samples", str(samples), "--reference",
                           str(samples), "--metrics", "fid"], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).parents[2])
    one_error_line(done.returncode, done.stderr, "other than tensors")
    assert not marker.exists()


def test_generate_probe_never_writes_through_a_planted_link(run_module, tiny_checkpoint, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".write-test").symlink_to("../victim.txt")
    code, _, stderr = run_module("addp.generate", ["--checkpoint", tiny_checkpoint, "--output-dir", out,
                                                   "--num-images", "1", "--batch-size", "1", "--steps", "2"])
    assert code == 0, stderr
    assert victim.read_text() == "precious" and (out / ".write-test").is_symlink()


def test_train_never_appends_through_a_dangling_log_link(run_module, tmp_path):
    out = tmp_path / "run"
    (out / "tokenizer").mkdir(parents=True)  # each stage logs in its own folder
    (out / "tokenizer" / "log.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    code, _, stderr = run_module("addp.train", ["--output-dir", out, "--stage", "tokenizer", "--tokenizer-steps", "2",
                                                "--batch-size", "8", "--num-samples", "0", "--warmup-steps", "0"])
    assert code == 2 and "symbolic link" in stderr and "Traceback" not in stderr, stderr
    assert not (tmp_path / "elsewhere.jsonl").exists()


HOLDER = """
import sys, time
from addp.runs.lock import FolderLock
FolderLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


dense = pytest.mark.skipif(importlib.util.find_spec("pycocotools") is None, reason="the dense extra is not installed")


@pytest.mark.parametrize("module, argv", [
    ("addp.train", ["--stage", "tokenizer", "--tokenizer-steps", "2", "--batch-size", "8", "--num-samples", "0"]),
    ("addp.finetune", ["--steps", "1", "--batch-size", "8"]),
    pytest.param("addp.detect", ["--steps", "1"], marks=dense),
    pytest.param("addp.segment", ["--steps", "1"], marks=dense),
])
def test_a_second_writer_of_a_run_folder_is_refused(run_module, tmp_path, module, argv):
    out = tmp_path / "run"
    out.mkdir()
    (out / "kept.txt").write_text("an earlier run's file")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[2])
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, stderr = run_module(module, ["--output-dir", out, *argv])
        one_error_line(code, stderr, f"in use by process {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt"]  # nothing of the refused run


def test_retraining_an_identical_config_gives_identical_files(run_module, tmp_path):
    files = {}
    for run in ("a", "b"):
        out = tmp_path / run
        code, _, stderr = run_module("addp.train", ["--output-dir", out, "--stage", "tokenizer", "--tokenizer-steps",
                                                    "2", "--batch-size", "8", "--num-samples", "0", "--device", "cpu"])
        assert code == 0, stderr
        files[run] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.safetensors"))}
        files[run].update({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("output.json"))})
    assert files["a"] and files["a"] == files["b"]
