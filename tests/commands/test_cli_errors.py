"""Bad input on every entry point: exit code 2, one `error:` line, no traceback, nothing
written; success: one JSON summary line of the same shape for every command."""
import errno
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import addp
from addp import sampling as S
from addp.cli import ArgumentParser, run_command
from addp.generate import batch_seed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def files(tmp_path_factory, tiny_checkpoint):
    """Inputs of the bad-input rows, good and bad, by name."""
    d = tmp_path_factory.mktemp("cli_inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / "image.png")
    hole = np.zeros((32, 32), np.uint8)
    hole[8:20, 4:24] = 255
    Image.fromarray(hole).save(d / "mask.png")
    (d / "notes.png").write_text("not an image")
    (d / "blocker").write_text("a file where a folder is needed")
    torch.manual_seed(0)
    addp.save_checkpoint(d / "tok_only.safetensors", addp.create_model("vqgan_small"))
    # stride 2: a 16x16 token grid from 32 px images, the network has 8x8
    addp.save_checkpoint(d / "other_grid_tok.safetensors", addp.create_model("vqgan_small", ch_mult=(1, 2)))
    (d / "corrupt.safetensors").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    save_file({"addp.x": torch.zeros(1)}, str(d / "not_object.safetensors"),
              metadata={"addp_format": "1", "addp_components": "[1, 2]"})
    os.mkfifo(d / "fifo.safetensors")  # reading it would block forever
    json_dir = d / "escaping_folder"
    addp.save_pretrained(json_dir, {"tokenizer": addp.create_model("vqgan_small")})
    index = json.loads((json_dir / "model_index.json").read_text())
    index["../tok_only"] = index.pop("tokenizer")
    (json_dir / "model_index.json").write_text(json.dumps(index))
    _reliability_inputs(d, tiny_checkpoint)
    return {"ckpt": tiny_checkpoint, **{p.stem: p for p in d.iterdir()}, "missing": d / "missing.png"}


def _reliability_inputs(d, tiny_checkpoint):
    """Crafted weights, settings and statistics files of the reliability rows."""
    models = addp.load_components(tiny_checkpoint)
    addp.save_pretrained(d / "nan_folder", models)
    state = load_file(str(d / "nan_folder" / "addp" / "model.safetensors"))
    next(t for t in state.values() if t.is_floating_point()).view(-1)[0] = float("nan")
    save_file(state, str(d / "nan_folder" / "addp" / "model.safetensors"), metadata={"format": "pt"})
    torch.save({"model": {"w": torch.zeros(2), "step": 3, "name": "x"}}, d / "non_tensors.pth")
    addp.save_pretrained(d / "absolute_folder", models)
    index = json.loads((d / "absolute_folder" / "model_index.json").read_text())
    index[str(d / "nan_folder" / "addp")] = index.pop("addp")
    (d / "absolute_folder" / "model_index.json").write_text(json.dumps(index))
    (d / "settings").mkdir()
    (d / "settings" / "generate.json").write_text("{not json")
    for name, text in (("settings_list", "[1, 2]"), ("settings_count", '{"images": "many"}'),
                       ("settings_outputs", '{"images": 2, "outputs": 5}')):
        (d / name).mkdir()
        (d / name / "generate.json").write_text(text)
    np.savez(d / "empty_samples.npz", arr_0=np.zeros((0, 32, 32, 3), np.uint8))
    np.savez(d / "three_samples.npz", arr_0=np.zeros((3, 32, 32, 3), np.uint8))
    np.savez(d / "one_sample.npz", arr_0=np.zeros((1, 32, 32, 3), np.uint8))
    classifier = addp.create_model("vit_small_cls", depth=1)
    addp.save_checkpoint(d / "classifier.safetensors", {"classifier": classifier})
    with torch.no_grad():
        classifier.patch_embed.proj.weight.mul_(1e38)  # finite weights, Inf features
    addp.save_checkpoint(d / "overflowing_classifier.safetensors", {"classifier": classifier})
    np.savez(d / "numeric_extractor.npz", mu=np.zeros(64), sigma=np.eye(64), feature_extractor=np.array(5))


def snapshot(folder):
    """Every file below `folder` with the hash of its bytes, and every folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


GEN = ["--checkpoint", "{ckpt}", "--output-dir", "{out}", "--num-images", "2", "--batch-size", "2"]
INP = ["--checkpoint", "{ckpt}", "--image", "{image}", "--output", "{out}/r.png"]
VIS = ["--checkpoint", "{ckpt}", "--output", "{out}/f.png"]
TRAIN = ["--output-dir", "{out}"]
FT = ["--output-dir", "{out}"]
EXP = ["--checkpoint", "{ckpt}", "--output", "{out}/e.safetensors"]
EVAL = ["--samples", "{out}", "--reference", "digits"]
TINY_TRAIN = ["--tokenizer-steps", "1", "--predictor-steps", "1", "--batch-size", "2", "--num-samples", "0"]

CASES = [
    # generate
    ("addp.generate", ["--output-dir", "{out}"], "required: --checkpoint"),
    ("addp.generate", ["--checkpoint", "{missing}", "--output-dir", "{out}"], "not found"),
    ("addp.generate", GEN + ["--num-images", "0"], "--num-images"),
    ("addp.generate", GEN + ["--batch-size", "-1"], "--batch-size"),
    ("addp.generate", GEN + ["--steps", "0"], "steps"),
    ("addp.generate", GEN + ["--num-inference-steps", "2.5"], "steps"),
    ("addp.generate", GEN + ["--temperature", "nan"], "--temperature"),
    ("addp.generate", GEN + ["--temperature-schedule", "cosine"], "--temperature-schedule"),
    ("addp.generate", GEN + ["--top-p", "1.5"], "--top-p"),
    ("addp.generate", GEN + ["--protocol", "paper"], "--protocol"),
    ("addp.generate", GEN + ["--seed", "-1"], "--seed"),
    ("addp.generate", GEN + ["--device", "bogus"], "--device"),
    ("addp.generate", GEN + ["--device", "cpu", "--cuda-graph"], "CUDA"),
    ("addp.generate", GEN + ["--precision", "fp8"], "--precision"),
    ("addp.generate", GEN + ["--output-dir", "{blocker}/out"], "cannot write"),
    ("addp.generate", GEN + ["--checkpoint", "{corrupt}"], "not a readable"),
    ("addp.generate", GEN + ["--checkpoint", "{not_object}"], "not a JSON object"),
    ("addp.generate", GEN + ["--checkpoint", "{tok_only}"], "no ADDP network"),
    ("addp.generate", GEN + ["--tokenizer", "{other_grid_tok}"], "token grid"),
    ("addp.generate", GEN + ["--bogus"], "unrecognized"),
    # inpaint
    ("addp.inpaint", INP, "exactly one of"),
    ("addp.inpaint", INP + ["--mask", "{mask}", "--uncrop", "2"], "exactly one of"),
    ("addp.inpaint", INP + ["--image", "{missing}", "--mask", "{mask}"], "not found"),
    ("addp.inpaint", INP + ["--image", "{notes}", "--mask", "{mask}"], "not a readable image"),
    ("addp.inpaint", INP + ["--mask", "{notes}"], "not a readable image"),
    ("addp.inpaint", INP + ["--left", "-3"], "margin"),
    ("addp.inpaint", INP + ["--uncrop", "1"], "--uncrop"),
    ("addp.inpaint", INP + ["--uncrop", "inf"], "--uncrop"),
    ("addp.inpaint", INP + ["--mask", "{mask}", "--top-p", "0"], "--top-p"),
    ("addp.inpaint", INP + ["--mask", "{mask}", "--output", "{blocker}/r.png"], "cannot write"),
    ("addp.inpaint", INP + ["--mask", "{mask}", "--output", "{out}"], "is a folder"),
    ("addp.inpaint", INP + ["--mask", "{mask}", "--tokenizer", "{other_grid_tok}"], "token grid"),
    # visualize
    ("addp.visualize", VIS + ["--num-images", "0"], "--num-images"),
    ("addp.visualize", VIS + ["--every", "0"], "--every"),
    ("addp.visualize", VIS + ["--scale", "-2"], "--scale"),
    ("addp.visualize", VIS + ["--temperature", "-1"], "--temperature"),
    ("addp.visualize", VIS + ["--output", "{out}"], "is a folder"),
    ("addp.visualize", VIS + ["--checkpoint", "{corrupt}"], "not a readable"),
    # train
    ("addp.train", TRAIN + ["--lr", "nan"], "--lr"),
    ("addp.train", TRAIN + ["--device", "bogus"], "--device"),
    ("addp.train", TRAIN + ["--log-every", "0"], "--log-every"),
    ("addp.train", TRAIN + ["--ckpt-every", "0"], "--ckpt-every"),
    ("addp.train", TRAIN + ["--crop-min", "2"], "--crop-min"),
    ("addp.train", TRAIN + ["--num-workers", "-1"], "--num-workers"),
    ("addp.train", TRAIN + ["--ema-decay", "2"], "--ema-decay"),
    ("addp.train", TRAIN + ["--steps", "-5"], "--steps"),
    ("addp.train", TRAIN + ["--batch-size", "0"], "--batch-size"),
    ("addp.train", TRAIN + ["--weight-decay", "-0.1"], "--weight-decay"),
    ("addp.train", TRAIN + ["--model-option", "image_size=30"], "image_size 30 is not a multiple of patch_size"),
    ("addp.train", TRAIN + ["--model-option", "patch_size=0"], "patch_size must be an integer >= 1"),
    ("addp.train", TRAIN + ["--model-option", "depth=abc"], "depth must be an integer >= 1"),
    ("addp.train", TRAIN + ["--model-option", "dropout=1.5"], "dropout"),
    ("addp.train", TRAIN + ["--model-option", "no_such_field=1"], "no option no_such_field"),
    ("addp.train", TRAIN + ["--model-option", "depth"], "KEY=VALUE"),
    ("addp.train", TRAIN + ["--sample-temperature", "nan"], "--sample-temperature"),
    ("addp.train", TRAIN + ["--num-samples", "-4"], "--num-samples"),
    ("addp.train", TRAIN + ["--sample-steps", "0"], "--sample-num-inference-steps"),
    ("addp.train", TRAIN + ["--resume", "{missing}"], "not found"),
    ("addp.train", TRAIN + ["--output-dir", "{blocker}"], "cannot write"),
    ("addp.train", TRAIN + ["--stage", "addp", "--tokenizer", "{other_grid_tok}"], "token grid"),
    ("addp.train", TRAIN + ["--stage", "addp", "--tokenizer", "{corrupt}"], "not a readable"),
    # finetune
    ("addp.finetune", FT + ["--ema-decay", "2"], "--ema-decay"),
    ("addp.finetune", FT + ["--labels-per-class", "0"], "--labels-per-class"),
    ("addp.finetune", FT + ["--epochs", "-1"], "--epochs"),
    ("addp.finetune", FT + ["--lr", "nan"], "--lr"),
    ("addp.finetune", FT + ["--device", "bogus"], "--device"),
    ("addp.finetune", FT + ["--layer-decay", "0"], "--layer-decay"),
    ("addp.finetune", FT + ["--reprob", "1.5"], "--reprob"),
    ("addp.finetune", FT + ["--finetune", "{missing}"], "not found"),
    ("addp.finetune", FT + ["--finetune", "{tok_only}"], "holds no encoder"),
    ("addp.finetune", FT + ["--finetune", "{ckpt}", "--input-size", "30"], "not a multiple of"),
    # export
    ("addp.export", EXP + ["--img-size", "0"], "--img-size"),
    ("addp.export", EXP + ["--img-size", "30"], "not a multiple of"),
    ("addp.export", EXP + ["--checkpoint", "{missing}"], "not found"),
    ("addp.export", EXP + ["--checkpoint", "{tok_only}"], "holds no encoder"),
    ("addp.export", EXP + ["--checkpoint", "{not_object}"], "not a JSON object"),
    ("addp.export", EXP + ["--output", "{out}"], "is a folder"),
    ("addp.export", EXP + ["--format", "tflite"], "--format"),
    # hostile files, and outputs that would replace inputs
    ("addp.generate", ["--checkpoint", "{fifo}", "--output-dir", "{out}"], "not a regular file"),
    ("addp.export", ["--checkpoint", "{escaping_folder}", "--output", "{out}/e.safetensors"], "not a path inside the folder"),
    ("addp.export", ["--checkpoint", "{ckpt}", "--output", "{ckpt}"], "--output is the --checkpoint"),
    ("addp.finetune", FT + ["--eval-only"], "--eval-only evaluates trained weights"),
    ("addp.inpaint", ["--checkpoint", "{ckpt}", "--image", "{image}", "--mask", "{mask}", "--output", "{image}"],
     "is an input of this command"),
    ("addp.inpaint", ["--checkpoint", "{ckpt}", "--image", "{image}", "--mask", "{mask}", "--output", "{out}/kept.txt"],
     "give a .png path"),
    ("addp.inpaint", ["--checkpoint", "{ckpt}", "--image", "{image}", "--mask", "{mask}", "--output", "{notes}"],
     "exists; pass --overwrite"),
    # evaluate
    ("addp.evaluate", EVAL + ["--batch-size", "0"], "--batch-size"),
    ("addp.evaluate", EVAL + ["--metrics", "fid,xyz"], "unknown metrics"),
    ("addp.evaluate", EVAL + ["--samples", "{missing}"], "does not exist"),
    ("addp.evaluate", EVAL + ["--feature-extractor", "{missing}"], "not found"),
    ("addp.evaluate", EVAL + ["--feature-extractor", "{ckpt}", "--inception-weights", "{ckpt}"], "not both"),
    ("addp.evaluate", EVAL + ["--output", "{blocker}/r.json"], "cannot write"),
    ("addp.evaluate", EVAL, "holds no png/jpg"),
    # the smoke run
    ("addp", ["--bogus"], "unrecognized"),
]

# Options that were silently ignored or gave wrong results, crafted files, and inputs that
# raised tracebacks: each is refused in one line before anything is written.
RELIABILITY_CASES = [
    ("addp.train", TRAIN + ["--resume", "{image}"], "--resume continues one stage"),
    ("addp.train", TRAIN + ["--stage", "addp", "--tokenizer", "{tok_only}", "--tokenizer-steps", "7"],
     "--tokenizer-steps trains a tokenizer"),
    ("addp.train", TRAIN + ["--tokenizer", "{tok_only}", "--tokenizer-model", "vqgan_small"], "--tokenizer-model"),
    ("addp.train", TRAIN + TINY_TRAIN + ["--steps", "10", "--warmup-steps", "10"], "--warmup-steps 10"),
    ("addp.train", TRAIN + TINY_TRAIN + ["--epochs", "1", "--warmup-epochs", "5"], "--warmup-epochs 5"),
    ("addp.generate", GEN + ["--checkpoint", "{nan_folder}"], "non-finite"),
    ("addp.finetune", FT + ["--finetune", "{nan_folder}"], "non-finite"),
    ("addp.generate", GEN + ["--checkpoint", "{non_tensors}"], "does not hold a state dict of tensors"),
    ("addp.export", EXP + ["--checkpoint", "{non_tensors}"], "does not hold a state dict of tensors"),
    ("addp.export", EXP + ["--format", "onnx"], "--output"),
    ("addp.export", EXP + ["--format", "torch-export"], "--output"),
    ("addp.visualize", VIS + ["--output", "{out}/f.jpg"], ".png"),
    ("addp.generate", GEN + ["--checkpoint", "/dev/zero"], "not a regular file"),
    ("addp.finetune", FT + ["--finetune", "/dev/zero"], "not a regular file"),
    ("addp.export", EXP + ["--checkpoint", "/dev/zero"], "not a regular file"),
    ("addp.train", TRAIN + ["--stage", "addp", "--tokenizer", "/dev/zero"], "not a regular file"),
    ("addp.train", TRAIN + ["--resume", "/dev/zero", "--stage", "tokenizer"], "not a regular file"),
    ("addp.generate", GEN + ["--checkpoint", "{escaping_folder}"], "not a path inside the folder"),
    ("addp.finetune", FT + ["--finetune", "{escaping_folder}"], "not a path inside the folder"),
    ("addp.finetune", FT + ["--finetune", "{ckpt}", "--eval-only"], "--eval-only evaluates a trained classifier"),
    ("addp.evaluate", EVAL + ["--samples", "{three_samples}", "--no-stats-cache", "--feature-extractor",
                              "{overflowing_classifier}"], "non-finite features"),
    # tracebacks of bad input
    ("addp.train", TRAIN + ["--model-option", "codebook_size=8"], "codebook_size"),
    ("addp.train", TRAIN + ["--model-option", "codebook_size=100000000000000"], "codebook_size"),
    ("addp.train", TRAIN + ["--model-option", "name=other"], "name is the preset's own"),
    ("addp.train", TRAIN + ["--model-option", "kind=tokenizer"], "kind is the preset's own"),
    ("addp.train", TRAIN + ["--model-option", "encoder=bogus"], "neither 'vit' nor a timm model"),
    ("addp.finetune", FT + ["--finetune", "{fifo}"], "not a regular file"),
    ("addp.train", TRAIN + ["--stage", "addp", "--tokenizer", "{fifo}"], "not a regular file"),
    ("addp.evaluate", EVAL + ["--samples", "{three_samples}", "--feature-extractor", "{fifo}"], "not a regular file"),
    ("addp.evaluate", EVAL + ["--samples", "{three_samples}", "--feature-extractor", "/dev/zero"], "not a regular file"),
    ("addp.evaluate", EVAL + ["--samples", "{three_samples}", "--inception-weights", "/dev/zero"], "not a regular file"),
    ("addp.generate", GEN + ["--checkpoint", "{absolute_folder}"], "not a path inside the folder"),
    ("addp.export", EXP + ["--img-size", "200000"], "--img-size"),
    ("addp.inpaint", INP + ["--left", "100000000"], "margin"),
    ("addp.generate", GEN + ["--output-dir", "{settings}"], "generate.json"),
    ("addp.generate", GEN + ["--output-dir", "{settings_list}"], "generate.json"),
    ("addp.generate", GEN + ["--output-dir", "{settings_count}"], "generate.json"),
    ("addp.generate", GEN + ["--output-dir", "{settings_outputs}"], "generate.json"),
    ("addp.finetune", FT + ["--aa", "garbage"], "--aa"),
    ("addp.finetune", FT + ["--aa", "randx"], "--aa"),
    ("addp.evaluate", EVAL + ["--samples", "{empty_samples}", "--feature-extractor", "{classifier}"], "no images"),
    ("addp.evaluate", EVAL + ["--samples", "{one_sample}", "--metrics", "kid", "--no-stats-cache",
                              "--feature-extractor", "{classifier}"], "kid needs at least 2"),
    ("addp.evaluate", EVAL + ["--samples", "{three_samples}", "--metrics", "prc", "--no-stats-cache",
                              "--feature-extractor", "{classifier}"], "prc needs at least 4"),
    ("addp.evaluate", EVAL + ["--samples", "{three_samples}", "--reference", "{numeric_extractor}",
                              "--feature-extractor", "{classifier}"], "feature_extractor"),
]


@pytest.mark.parametrize("module,argv,match", CASES + RELIABILITY_CASES,
                         ids=[f"{m}:{' '.join(a[-2:])}" for m, a, _ in CASES] +
                             [f"rel-{m}:{' '.join(a[-2:])}" for m, a, _ in RELIABILITY_CASES])
def test_bad_input_is_one_line_and_writes_nothing(run_module, files, tmp_path, module, argv, match):
    out = tmp_path / "run"
    out.mkdir()
    (out / "kept.txt").write_text("a file of an earlier run")
    before = snapshot(tmp_path)
    code, stdout, stderr = run_module(module, [a.format(out=out, **files) for a in argv])
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], stderr
    assert "Traceback" not in stderr and stdout == ""
    assert snapshot(tmp_path) == before


def summary_of(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout
    summary = json.loads(lines[0])
    assert summary["status"] == "ok"
    return summary


def test_success_is_one_json_line(run_module, files, tmp_path):
    code, stdout, stderr = run_module("addp.export", ["--checkpoint", files["ckpt"],
                                                      "--output", tmp_path / "e.safetensors"])
    assert code == 0, stderr
    summary = summary_of(stdout)
    assert summary["command"] == "export" and summary["output"] == str(tmp_path / "e.safetensors")
    assert "timm.create_model" in stderr  # the how-to-load note is a log line
    code, stdout, stderr = run_module("addp", [])
    assert code == 0, stderr
    assert summary_of(stdout)["command"] == "smoke"


def test_parity_flag_gives_the_library_images(run_module, files, tmp_path):
    """--parity (and a protocol with an explicit override) from the command line gives exactly
    the images of `sampler.generate` with those settings, for the same seed and batch size."""
    net = addp.load_checkpoint(files["ckpt"])
    tok = addp.load_checkpoint(files["ckpt"], component="tokenizer")
    runs = {"parity": (["--parity", "--steps", "3", "--temperature-schedule", "static"],
                       S.SamplerConfig(steps=3, parity=True, temperature_schedule="static")),
            "protocol": (["--protocol", "paper-steps256", "--num-inference-steps", "4"],
                         S.SamplerConfig(steps=4, schedule="linear", parity=True))}
    for name, (flags, config) in runs.items():
        out = tmp_path / name
        code, stdout, stderr = run_module("addp.generate", ["--checkpoint", files["ckpt"], "--num-images", "3",
                                                            "--batch-size", "3", "--seed", "7", "--device", "cpu",
                                                            "--precision", "fp32", "--output-dir", out, *flags])
        assert code == 0, stderr
        assert summary_of(stdout)["sampler"] == {**config.__dict__}
        expected = S.generate(net, tok, 3, config, generator=torch.Generator().manual_seed(batch_seed(7, 0)))
        expected = (expected.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        got = np.stack([np.asarray(Image.open(out / f"{i:06d}.png")) for i in range(3)])
        assert np.array_equal(got, expected)
    # the parity step changes the images: the two settings are not the same run
    plain = tmp_path / "plain"
    assert run_module("addp.generate", ["--checkpoint", files["ckpt"], "--num-images", "3", "--batch-size", "3",
                                        "--seed", "7", "--device", "cpu", "--steps", "3", "--temperature-schedule",
                                        "static", "--output-dir", plain])[0] == 0
    assert (plain / "000000.png").read_bytes() != (tmp_path / "parity" / "000000.png").read_bytes()


@pytest.mark.parametrize("failure,match", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out of memory"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/000001.png"), "No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/out"), "Permission denied: /data/out"),
])
def test_runner_turns_device_and_os_failures_into_one_line(capsys, failure, match):
    def main(args):
        raise failure
    assert run_command("demo", ArgumentParser("demo"), main, []) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error:") and match in captured.err
    assert captured.err.count("\n") == 1


def test_a_failed_cpu_allocation_is_one_line_naming_only_options_the_command_has(capsys):
    def main(args):
        torch.empty(2 ** 62, dtype=torch.uint8)  # PyTorch's CPU allocator refuses it
    parsers = {"demo": ArgumentParser("demo"), "batched": ArgumentParser("batched")}
    parsers["batched"].add_argument("--batch-size", default=8)
    for name, parser in parsers.items():
        assert run_command(name, parser, main, []) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: out of memory") and err.count("\n") == 1, err
        assert ("--batch-size" in err) == (name == "batched"), err


def test_runner_interrupt_is_one_line_and_130(capsys, tmp_path):
    def main(args):
        raise KeyboardInterrupt
    parser = ArgumentParser("demo")
    parser.add_argument("--output-dir", default=str(tmp_path))
    assert run_command("demo", parser, main, [], interrupted="kept what is in {output_dir}") == 130
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == f"interrupted: kept what is in {tmp_path}"
