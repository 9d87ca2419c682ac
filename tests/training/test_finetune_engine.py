"""The fine-tuning engine the three fine-tuning commands share: one declaration of the training
flags, one meaning of --eval-every, one run identity (the starting weights' hash), the same
refusals in `addp.finetune`, `addp.detect` and `addp.segment`."""
import importlib
import json

import pytest
import torch

import addp
from addp.cli import ArgumentParser
from addp.models.checkpoint import load_components
from addp.training import finetune_engine

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("pycocotools")  # detect and segment need the dense extra

COMMANDS = ("finetune", "detect", "segment")


def tiny(command, canvases):
    """A 2-step run of `command`: the digits at batch 8, or the 64 px canvases."""
    if command == "finetune":
        return ["--steps", 2, "--batch-size", 8]
    return ["--steps", 2, "--canvas-dir", canvases, "--input-size", 64, "--jitter", 1, 1]


def parser_of(command):
    return importlib.import_module(f"addp.{command}").get_args_parser()


def options(parser):
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings}


def kind(action):
    """What an option does and the name of its argument type (a closure is made per parser)."""
    return type(action), getattr(action.type, "__qualname__", action.type), action.nargs


def one_error_line(code, stderr, match):
    lines = stderr.strip().splitlines()
    assert code == 2 and lines and lines[-1].startswith("error:") and match in lines[-1], stderr
    assert not any(line.startswith("error:") for line in lines[:-1]) and "Traceback" not in stderr, stderr
    return lines[-1]


def addp_file(path, seed):
    torch.manual_seed(seed)
    return addp.save_checkpoint(path, {"addp": addp.create_model("addp_vit_small")})


def test_every_command_has_every_shared_flag():
    declared = ArgumentParser("probe")
    finetune_engine.add_training_args(declared, "finetune", steps=1, blr=1e-3, layer_decay=0.5)
    shared = options(declared)
    assert {"--finetune", "--eval-every", "--warmup-epochs", "--resume", "--force", "--seed"} <= set(shared)
    for command in COMMANDS:
        found = options(parser_of(command))
        assert set(shared) <= set(found), (command, sorted(set(shared) - set(found)))
        for flag, action in shared.items():
            if flag not in ("--recipe", "--finetune"):  # the choices and the kinds of weights are the command's
                assert kind(found[flag]) == kind(action), (command, flag)


def test_eval_every_help_is_the_same_in_every_command():
    helps = {command: options(parser_of(command))["--eval-every"].help for command in COMMANDS}
    assert set(helps.values()) == {finetune_engine.EVAL_EVERY_HELP}, helps
    assert "0: at the last step only" in finetune_engine.EVAL_EVERY_HELP


@pytest.mark.parametrize("command", COMMANDS)
def test_eval_every_zero_keeps_best_and_last(run_module, canvases, tmp_path, command):
    out = tmp_path / "run"
    code, stdout, stderr = run_module(f"addp.{command}", tiny(command, canvases) + ["--output-dir", out,
                                                                                    "--eval-every", 0])
    assert code == 0, stderr[-2000:]
    for name in ("checkpoint-best.safetensors", "checkpoint-last.safetensors", "best.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "best.json").read_text())["step"] == 2
    evaluated = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
                 if len(json.loads(line)) > 1 and "loss" not in json.loads(line)]
    assert evaluated == [2]  # once, at the last step


@pytest.mark.parametrize("command", COMMANDS)
def test_resume_after_the_starting_weights_changed_is_refused(run_module, canvases, tmp_path, command):
    start, out = tmp_path / "addp.safetensors", tmp_path / "run"
    addp_file(start, seed=0)
    argv = tiny(command, canvases) + ["--finetune", start, "--output-dir", out]
    code, _, stderr = run_module(f"addp.{command}", argv)
    assert code == 0, stderr[-2000:]
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["finetune"] == str(start) and len(recorded["finetune_sha256"]) == 64
    addp_file(start, seed=1)  # the same path, other weights
    code, _, stderr = run_module(f"addp.{command}", argv + ["--resume", out / "checkpoint.pt"])
    one_error_line(code, stderr, "finetune_sha256")


def test_force_clears_the_best_of_the_run_before(run_module, canvases, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "best.json").write_text(json.dumps({"step": 7, "mIoU": 1000.0}))
    (out / "checkpoint-last.safetensors").write_text("an earlier run's")
    code, _, stderr = run_module("addp.segment", tiny("segment", canvases) + ["--output-dir", out, "--force"])
    assert code == 0, stderr[-2000:]
    best = json.loads((out / "best.json").read_text())
    assert best["step"] == 2 and best["mIoU"] < 1000
    assert "segmenter" in load_components(out / "checkpoint-last.safetensors")  # the new run's


@pytest.mark.parametrize("command", COMMANDS)
def test_eval_only_without_weights_is_refused(run_module, tmp_path, command):
    code, _, stderr = run_module(f"addp.{command}", ["--eval-only", "--output-dir", tmp_path / "run"])
    one_error_line(code, stderr, "--eval-only evaluates trained weights: give --finetune or --resume")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_a_warmup_not_shorter_than_the_run_is_refused(run_module, canvases, tmp_path, command):
    argv = tiny(command, canvases) + ["--warmup-steps", 2, "--output-dir", tmp_path / "run"]
    code, _, stderr = run_module(f"addp.{command}", argv)
    one_error_line(code, stderr, "warm-up --warmup-steps 2 must be shorter than the run (2 steps)")


@pytest.mark.parametrize("command", COMMANDS)
def test_eval_only_on_a_pretraining_checkpoint_is_refused(run_module, canvases, tmp_path, command):
    """Its heads would be random: an evaluation of nothing trained."""
    start = addp_file(tmp_path / "addp.safetensors", seed=0)
    argv = tiny(command, canvases) + ["--eval-only", "--finetune", start, "--output-dir", tmp_path / "run"]
    code, _, stderr = run_module(f"addp.{command}", argv)
    one_error_line(code, stderr, "holds a pretraining checkpoint")
