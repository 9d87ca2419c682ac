"""Run folders: cached stage outputs are reused only when they match the command, unreadable
or non-finite files are refused in one line, and nothing half-written or repeated is left."""
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import addp
from addp import train
from addp.models.checkpoint import CheckpointError
from addp.runs.files import remove_stale_temp_files, write_json
from addp.training.data import DigitsDataset, ImageFolderDataset, make_loader, with_worker_causes
from addp.runtime.distributed import DistInfo
from addp.sampling.pipeline import ADDPPipeline
from addp.models.registry import AddpError

from addp.training.stages import TokenizerStage
from addp.training.config import TrainConfig
from addp.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

from conftest import TINY, one_error_line


def folder_hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run folder (all three stages), trained once for the module."""
    out = tmp_path_factory.mktemp("run") / "o"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train.cli(["--output-dir", str(out), *TINY]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def copy_run(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "o"))


# -- content-addressed stages --------------------------------------------------------------------
@pytest.mark.slow
def test_retrained_tokenizer_is_refused_and_the_bundle_kept(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    common = ("--output-dir", str(out), *TINY)
    good = (out / "addp.safetensors").read_bytes()
    assert train.cli([*common, "--stage", "tokenizer", "--force", "--tokenizer-steps", "3"]) == 0
    assert (out / "tokenizer.safetensors").read_bytes() != (trained / "tokenizer.safetensors").read_bytes()
    capsys.readouterr()
    before = folder_hashes(out)

    assert train.cli([*common, "--stage", "all"]) == 2  # the command would train a 2-step tokenizer
    err = one_error_line(capsys)
    assert "stage tokenizer" in err and "steps: 3 -> 2" in err and "--force" in err

    assert train.cli([*common, "--stage", "all", "--tokenizer-steps", "3"]) == 2  # tokenizer fits now
    err = one_error_line(capsys)
    assert "stage predictor" in err and "tokenizer_sha256" in err and "--force" in err

    assert train.cli([*common, "--stage", "addp", "--tokenizer-steps", "3"]) == 2
    err = one_error_line(capsys)
    assert "stage predictor" in err and "trained against other inputs" in err
    assert folder_hashes(out) == before and (out / "addp.safetensors").read_bytes() == good

    # --force retrains what does not match; the bundle is made of parts that belong together
    assert train.cli([*common, "--stage", "all", "--force"]) == 0
    records = {s: json.loads((out / s / "output.json").read_text()) for s in ("tokenizer", "predictor", "addp")}
    tok_sha = hashlib.sha256((out / "tokenizer.safetensors").read_bytes()).hexdigest()
    assert records["tokenizer"]["sha256"] == tok_sha and records["tokenizer"]["identity"]["steps"] == 2
    assert records["predictor"]["identity"]["tokenizer_sha256"] == tok_sha
    assert records["addp"]["identity"]["tokenizer_sha256"] == tok_sha
    assert records["addp"]["identity"]["predictor_sha256"] == records["predictor"]["sha256"]
    bundled = addp.load_checkpoint(out / "addp.safetensors", component="tokenizer").state_dict()
    cached = addp.load_checkpoint(out / "tokenizer.safetensors").state_dict()
    assert all(torch.equal(bundled[k], cached[k]) for k in cached)


def test_a_finished_folder_refuses_other_tokenizer_steps(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    before = folder_hashes(out)
    assert train.cli(["--output-dir", str(out), *TINY, "--tokenizer-steps", "7"]) == 2
    assert "stage tokenizer" in one_error_line(capsys)
    assert folder_hashes(out) == before


@pytest.mark.parametrize("damage, reason", [
    (lambda out: (out / "predictor" / "output.json").unlink(), "has no record"),
    (lambda out: (out / "predictor" / "output.json").write_text("{not json"), "has no record"),
    (lambda out: shutil.copy(out / "tokenizer.safetensors", out / "predictor.safetensors"), "was changed"),
])
def test_a_stage_output_without_a_matching_record_is_refused(trained, tmp_path, capsys, damage, reason):
    out = copy_run(trained, tmp_path)
    damage(out)
    before = folder_hashes(out)
    assert train.cli(["--output-dir", str(out), *TINY, "--stage", "addp"]) == 2
    err = one_error_line(capsys)
    assert "stage predictor" in err and reason in err
    assert folder_hashes(out) == before


def test_an_unchanged_finished_folder_is_reused_as_is(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    before = folder_hashes(out)
    assert train.cli(["--output-dir", str(out), *TINY, "--stage", "predictor"]) == 0
    log = capsys.readouterr().err
    assert "[tokenizer] cached" in log and "[predictor] cached" in log
    after = folder_hashes(out)
    assert {k: v for k, v in after.items() if k != "report.json"} == \
           {k: v for k, v in before.items() if k != "report.json"}


# -- unreadable training checkpoints -------------------------------------------------------------
def tokenizer_trainer(out: Path, steps=2, lr=1e-3, **kw) -> Trainer:
    torch.manual_seed(0)
    cfg = TrainConfig(steps=steps, batch_size=8, lr=lr, log_every=1, **kw)
    return Trainer(TokenizerStage(addp.create_model("vqgan_small")), cfg, out, DistInfo(), identity={"run": 1})


def digits_loader(start, stop_after=None):
    for i, item in enumerate(make_loader(DigitsDataset("train"), 8, 0, 0, 1, start, 0)):
        if stop_after is not None and i == stop_after:
            raise KeyboardInterrupt
        yield item


def write_checkpoint_like(path: Path, edit) -> None:
    t = tokenizer_trainer(path.parent / "src")
    state = t.state_dict()
    edit(state)
    torch.save(state, path)


BAD_CHECKPOINTS = {
    "garbage": lambda p: p.write_bytes(b"\x00not a checkpoint" * 10),
    "truncated": lambda p: (write_checkpoint_like(p, lambda s: None), p.write_bytes(p.read_bytes()[:500])),
    "safetensors": lambda p: p.write_bytes(addp.save_checkpoint(p.parent / "m.safetensors",
                                                                addp.create_model("vqgan_small")).read_bytes()),
    "no identity": lambda p: write_checkpoint_like(p, lambda s: s.pop("identity")),
    "identity not json": lambda p: write_checkpoint_like(p, lambda s: s.update(identity="{oops")),
    "a list": lambda p: torch.save([1, 2, 3], p),
    "a step past the run": lambda p: write_checkpoint_like(p, lambda s: s.update(step=10 ** 9)),
    "a negative step": lambda p: write_checkpoint_like(p, lambda s: s.update(step=-3)),
    "a step that is text": lambda p: write_checkpoint_like(p, lambda s: s.update(step="2")),
}


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_unreadable_checkpoint_in_the_folder_is_an_error_and_force_starts_over(tmp_path, kind):
    BAD_CHECKPOINTS[kind](tmp_path / "checkpoint.pt")
    with pytest.raises(AddpError, match="cannot resume from .*--force") as e:
        tokenizer_trainer(tmp_path).maybe_resume(None, force=False)
    assert "\n" not in str(e.value)
    trainer = tokenizer_trainer(tmp_path)
    trainer.maybe_resume(None, force=True)
    assert trainer.step == 0
    trainer.fit(digits_loader)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS) + ["a folder", "weights of another model",
                                                          "non-finite weights", "weights that are not tensors",
                                                          "losses that are not a tensor", "a device file"])
def test_bad_resume_file_is_one_error_line_even_with_force(tmp_path, kind):
    path = tmp_path / "bad" / "checkpoint.pt"
    path.parent.mkdir()
    if kind == "a folder":
        path.mkdir()
    elif kind == "weights of another model":  # same identity, a smaller network's tensors
        write_checkpoint_like(path, lambda s: s.update(model={"encoder.conv_in.weight": torch.zeros(1)}))
    elif kind == "non-finite weights":
        write_checkpoint_like(path, lambda s: s["model"]["decoder.conv_out.bias"].fill_(float("nan")))
    elif kind == "weights that are not tensors":
        write_checkpoint_like(path, lambda s: s["model"].update({"decoder.conv_out.bias": "text", "n": 3}))
    elif kind == "losses that are not a tensor":
        write_checkpoint_like(path, lambda s: s.update(losses=[0.5, "x"]))
    elif kind == "a device file":
        path = Path("/dev/zero")
    else:
        BAD_CHECKPOINTS[kind](path)
    with pytest.raises(AddpError) as e:
        tokenizer_trainer(tmp_path / "o").maybe_resume(str(path), force=True)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    if kind == "non-finite weights":
        assert "decoder.conv_out.bias" in message and "non-finite" in message


def test_corrupt_checkpoint_through_the_command_line(tmp_path, capsys):
    out = tmp_path / "o"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated zip")
    args = ["--output-dir", str(out), *TINY, "--stage", "tokenizer"]
    assert train.cli(args) == 2
    assert "--force" in one_error_line(capsys)
    assert train.cli([*args, "--resume", str(tmp_path / "missing.pt")]) == 2
    assert "not found" in one_error_line(capsys)
    assert train.cli([*args, "--force"]) == 0
    assert torch.load(out / "tokenizer" / "checkpoint.pt", weights_only=True)["step"] == 2


# -- finite checks -----------------------------------------------------------------------------
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = tokenizer_trainer(tmp_path, steps=30, lr=1e30, ckpt_every=1)
    trainer.maybe_resume(None, force=False)
    with pytest.raises(AddpError, match=r"diverged at step \d+: .*last good checkpoint") as e:
        trainer.fit(digits_loader)
    assert trainer.step < 30 and "\n" not in str(e.value)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert (state["step"], tmp_path / "checkpoint.pt") == trainer.last_good and state["step"] < trainer.step
    assert all(bool(torch.isfinite(t).all()) for t in state["model"].values() if t.is_floating_point())
    for line in (tmp_path / "log.jsonl").read_text().splitlines():
        entry = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
        assert math.isfinite(entry["loss"])


def test_huge_learning_rate_exits_2_and_writes_no_bundle(tmp_path, capsys):
    torch.manual_seed(0)
    tok = addp.save_checkpoint(tmp_path / "t.safetensors", addp.create_model("vqgan_small"))
    pred = addp.save_checkpoint(tmp_path / "p.safetensors", addp.create_model("mage_vit_small"))
    out = tmp_path / "o"
    code = train.cli(["--stage", "addp", "--tokenizer", str(tok), "--predictor", str(pred), "--lr", "1e30",
                      "--steps", "4", "--ckpt-every", "1", "--log-every", "1", "--batch-size", "4",
                      "--warmup-steps", "0", "--num-samples", "4", "--model-option", "depth=1",
                      "--model-option", "decoder_depth=1", "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("error: [addp] training diverged at step")
    assert not (out / "addp.safetensors").exists() and not (out / "report.json").exists()
    assert not (out / "samples.png").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(tmp_path, value, suffix):
    model = addp.create_model("vqgan_small")
    with torch.no_grad():
        model.decoder.conv_out.weight[0, 0, 0, 0] = value
    path = tmp_path / f"m{suffix}"
    if suffix == ".safetensors":
        addp.save_checkpoint(path, model)
        name = "tokenizer.decoder.conv_out.weight"
    else:
        torch.save(model.state_dict(), path)
        name = "decoder.conv_out.weight"
    with pytest.raises(CheckpointError, match=f"tensor {name} holds non-finite") as e:
        addp.load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_a_bundle_with_an_inf_tokenizer_is_refused_by_the_pipeline(tmp_path):
    tok = addp.create_model("vqgan_small")
    with torch.no_grad():
        tok.quantize.embedding.weight[3] = float("inf")
    path = addp.save_checkpoint(tmp_path / "b.safetensors", {"addp": addp.create_model("addp_vit_small"),
                                                             "tokenizer": tok})
    with pytest.raises(CheckpointError, match=r"tensor tokenizer\.quantize\.embedding\.weight holds non-finite"):
        ADDPPipeline.from_pretrained(path)


def test_report_is_strict_json(tmp_path):
    write_json(tmp_path / "report.json", {"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": -math.inf}})
    text = (tmp_path / "report.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert report == {"a": None, "b": [1.5, None], "c": {"d": None}}


# -- temporary files and logs -------------------------------------------------------------------
KILLED_WRITER = """
import sys, time
from addp.models.checkpoint import atomic_write
def write(tmp):
    with open(tmp, "wb") as f:
        f.write(b"half a checkpoint")
        f.flush()
    print("writing", flush=True)
    time.sleep(600)
atomic_write(sys.argv[1], write)
"""


def test_temp_files_of_a_killed_save_are_removed_at_the_next_start(tmp_path, capsys):
    out = tmp_path / "o"
    ckpt = out / "tokenizer" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"the last complete checkpoint")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(ckpt)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    left = [p for p in ckpt.parent.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and ckpt.read_bytes() == b"the last complete checkpoint"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = ckpt.parent / f".addp-checkpoint.pt.{live.pid}.abcd1234.tmp"  # a writer still running
        other = [ckpt.parent / "notes.tmp", out / ".hidden.tmp",  # not our names
                 ckpt.parent / f".checkpoint.pt.{2 ** 22 + 1}.word.tmp"]
        for p in [mine, *other]:
            p.write_text("x")
        assert train.cli(["--output-dir", str(out), *TINY, "--stage", "tokenizer"]) == 2  # the bad checkpoint
        one_error_line(capsys)
        assert not left[0].exists() and mine.exists() and all(p.exists() for p in other)
    finally:
        live.kill()
        live.wait()
    assert remove_stale_temp_files(ckpt.parent) == [mine]


def test_log_does_not_repeat_steps_after_a_resume(tmp_path):
    trainer = tokenizer_trainer(tmp_path, steps=6, ckpt_every=3)
    trainer.maybe_resume(None, force=False)
    with pytest.raises(KeyboardInterrupt):  # interrupted while fetching step 6's batch
        trainer.fit(lambda start: digits_loader(start, stop_after=5))
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    first = (tmp_path / "log.jsonl").read_text().splitlines()[:3]
    resumed = tokenizer_trainer(tmp_path, steps=6, ckpt_every=3)
    resumed.maybe_resume(None, force=False)
    assert resumed.step == 3
    resumed.fit(digits_loader)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[:3] == first


# -- data-loading workers --------------------------------------------------------------------------
def test_a_workers_error_keeps_its_cause(tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    for i in range(24):
        (root / f"{i:02d}.png").write_bytes(b"not a png")
    data = ImageFolderDataset(root, 8)
    with pytest.raises(AddpError, match=r"^20 unreadable images in a row near .* \(in DataLoader worker"):
        next(with_worker_causes(make_loader(data, 4, 0, 0, 1, 0, num_workers=1)))
    assert train.cli(["--data-path", str(root), "--output-dir", str(tmp_path / "o"), *TINY,
                      "--stage", "tokenizer", "--num-workers", "1"]) == 2
    assert "20 unreadable images in a row" in one_error_line(capsys)
