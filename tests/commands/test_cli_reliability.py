"""Bad states rather than bad options: a run killed between a stage output and its record, a
garbage launch environment, a full disk, a network whose predictions are NaN, and checkpoints
given as save_pretrained folders. Each either works or ends in one `error:` line (exit 2)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import addp
from addp import export, finetune, generate, train
from addp.runs.records import read_record, sha256_file
from addp.training import run_stages

from conftest import TINY, one_error_line

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENIZER_RUN = [*TINY, "--stage", "tokenizer"]


# -- a kill between a stage output and its record ----------------------------------------------
def _killed_before_the_record(monkeypatch, out, stage="tokenizer", argv=TOKENIZER_RUN):
    """Run `argv` and stop it (as a kill would: no clean-up runs) right after `stage`'s output
    file is written, before the record that says what made it."""
    write_record = run_stages.write_record

    def killed(folder, name, *args, **kwargs):
        if name == stage:
            raise KeyboardInterrupt
        return write_record(folder, name, *args, **kwargs)
    monkeypatch.setattr(run_stages, "write_record", killed)
    assert train.cli(["--output-dir", str(out), *argv]) == 130
    monkeypatch.setattr(run_stages, "write_record", write_record)
    assert (out / f"{stage}.safetensors").exists() and read_record(out, stage)["pending"] is True


@pytest.mark.parametrize("stage, argv", [("tokenizer", TOKENIZER_RUN), ("addp", TINY)])
def test_a_kill_between_the_output_and_its_record_is_recovered_by_the_same_command(monkeypatch, tmp_path, capsys,
                                                                                   stage, argv):
    out = tmp_path / "o"
    _killed_before_the_record(monkeypatch, out, stage, argv)
    capsys.readouterr()
    assert train.cli(["--output-dir", str(out), *argv]) == 0, capsys.readouterr().err
    record = read_record(out, stage)
    assert "pending" not in record and record["sha256"] == sha256_file(out / f"{stage}.safetensors")
    if stage == "tokenizer":  # the next stage takes it as a finished output
        assert train.cli(["--output-dir", str(out), *TINY, "--stage", "predictor"]) == 0, capsys.readouterr().err


def test_another_command_over_an_unfinished_output_is_refused(monkeypatch, tmp_path, capsys):
    out = tmp_path / "o"
    _killed_before_the_record(monkeypatch, out)
    before = (out / "tokenizer.safetensors").read_bytes()
    capsys.readouterr()
    assert train.cli(["--output-dir", str(out), *TOKENIZER_RUN, "--tokenizer-lr", "0.01"]) == 2
    assert "was being made from something else" in one_error_line(capsys)
    assert train.cli(["--output-dir", str(out), *TINY, "--stage", "predictor"]) == 2
    assert "was not finished" in one_error_line(capsys)
    assert (out / "tokenizer.safetensors").read_bytes() == before


def test_resume_into_a_finished_stage_is_refused_not_ignored(tmp_path, capsys):
    out = tmp_path / "o"
    assert train.cli(["--output-dir", str(out), *TOKENIZER_RUN]) == 0
    before = (out / "tokenizer.safetensors").read_bytes()
    capsys.readouterr()
    resume = str(out / "tokenizer" / "checkpoint.pt")
    assert train.cli(["--output-dir", str(out), *TOKENIZER_RUN, "--resume", resume]) == 2
    assert "nothing would be resumed" in one_error_line(capsys)
    assert (out / "tokenizer.safetensors").read_bytes() == before


# -- the launch environment --------------------------------------------------------------------
@pytest.mark.parametrize("env, name", [
    ({"RANK": "abc"}, "RANK"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE"),
    ({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "x"}, "LOCAL_RANK"),
    ({"WORLD_SIZE": "2", "RANK": "5"}, "does not fit"),
])
def test_garbage_launch_environment_is_one_line(monkeypatch, tiny_checkpoint, tmp_path, capsys, env, name):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = ["--checkpoint", str(tiny_checkpoint), "--output-dir", str(tmp_path / "g"), "--num-images", "1"]
    assert generate.cli(argv) == 2
    assert name in one_error_line(capsys)
    assert not (tmp_path / "g").exists() or not any((tmp_path / "g").iterdir())


# -- a full disk -------------------------------------------------------------------------------
FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
import runpy
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("module, argv, target", [
    ("addp.export", ["--checkpoint", "{ckpt}", "--output", "{out}/e.safetensors"], "e.safetensors"),  # safetensors
    ("addp.train", ["--output-dir", "{out}", *TOKENIZER_RUN], "checkpoint.pt"),  # torch.save
])
def test_a_write_that_fails_midway_is_one_line_and_leaves_no_file(tiny_checkpoint, tmp_path, module, argv, target):
    """A file size limit makes the kernel fail the write as a full disk would (EFBIG, ENOSPC):
    torch.save and safetensors report it as their own error types."""
    out = tmp_path / "o"
    argv = [a.format(ckpt=tiny_checkpoint, out=out) for a in argv]
    proc = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, module, *argv], capture_output=True, text=True,
                          timeout=600)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: cannot write") and target in last, err
    assert not list(out.rglob(target)) and not list(out.rglob("*.tmp"))


# -- a network whose predictions are not finite ------------------------------------------------
@pytest.fixture(scope="module")
def overflowing_checkpoint(tmp_path_factory, tiny_checkpoint):
    """Finite weights whose logits overflow to Inf and NaN: the output head scaled by 1e38."""
    models = addp.load_components(tiny_checkpoint)
    head = dict(models["addp"].named_parameters())
    name = [n for n in head if n.endswith("weight") and head[n].dim() == 2][-1]  # the last linear layer
    with torch.no_grad():
        head[name].mul_(1e38)
    path = tmp_path_factory.mktemp("overflow") / "overflow.safetensors"
    addp.save_checkpoint(path, models)
    return path


def test_nan_predictions_make_no_images(overflowing_checkpoint, tmp_path, capsys):
    net = addp.load_checkpoint(overflowing_checkpoint)
    logits = net(torch.zeros(1, 3, 32, 32), torch.zeros(1, 64, dtype=torch.long), torch.ones(1, 64, dtype=torch.bool), 0)
    assert not torch.isfinite(logits).all()  # the premise: the weights are finite, the logits are not
    out = tmp_path / "g"
    assert generate.cli(["--checkpoint", str(overflowing_checkpoint), "--output-dir", str(out), "--num-images", "2",
                         "--batch-size", "2", "--steps", "3", "--device", "cpu"]) == 2
    assert "predictions are not finite" in one_error_line(capsys)
    assert not list(out.glob("*.png"))
    pipe = addp.ADDPPipeline.from_pretrained(overflowing_checkpoint)
    with pytest.raises(addp.AddpError, match="not finite"):
        pipe.inpaint(torch.rand(1, 3, 32, 32), torch.ones(32, 32, dtype=torch.bool).triu(), num_inference_steps=2)


# -- save_pretrained folders as --checkpoint ---------------------------------------------------
def test_a_save_pretrained_folder_gives_the_images_of_its_file(tiny_checkpoint, tmp_path, capsys):
    folder = addp.save_pretrained(tmp_path / "folder", addp.load_components(tiny_checkpoint))
    common = ["--num-images", "2", "--batch-size", "2", "--steps", "3", "--device", "cpu", "--precision", "fp32"]
    for name, source in (("file", tiny_checkpoint), ("folder", folder)):
        assert generate.cli(["--checkpoint", str(source), "--output-dir", str(tmp_path / name), *common]) == 0, \
            capsys.readouterr().err
    for i in range(2):
        a, b = (np.asarray(Image.open(tmp_path / n / f"{i:06d}.png")) for n in ("file", "folder"))
        assert np.array_equal(a, b)
    record = json.loads((tmp_path / "folder" / "generate.json").read_text())
    assert record["checkpoint_sha256"] != json.loads((tmp_path / "file" / "generate.json").read_text())["checkpoint_sha256"]


def test_finetune_and_export_take_a_save_pretrained_folder(tiny_checkpoint, tmp_path, capsys):
    folder = addp.save_pretrained(tmp_path / "folder", addp.load_components(tiny_checkpoint))
    for name, source in (("file", tiny_checkpoint), ("folder", folder)):
        assert export.cli(["--checkpoint", str(source), "--output", str(tmp_path / f"{name}.safetensors")]) == 0
    a, b = (load_file(str(tmp_path / f"{n}.safetensors")) for n in ("file", "folder"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(0)
    classifier = {"classifier": addp.create_model("vit_small_cls", depth=1, num_classes=10)}
    sources = {"file": addp.save_checkpoint(tmp_path / "clf.safetensors", classifier),
               "folder": addp.save_pretrained(tmp_path / "clf", classifier)}
    for name, source in sources.items():
        assert finetune.cli(["--finetune", str(source), "--output-dir", str(tmp_path / name), "--eval-only"]) == 0, \
            capsys.readouterr().err
    a, b = (json.loads((tmp_path / n / "eval.json").read_text()) for n in sources)
    assert a["val_num_images"] == b["val_num_images"] > 0 and a["val_loss"] == b["val_loss"]
