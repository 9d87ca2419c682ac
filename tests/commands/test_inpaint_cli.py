"""`python -m addp.inpaint` on a tiny random checkpoint: outputs, known pixels, sizes, one-line errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import addp
from addp import inpaint as I

STEPS = "3"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inp") / "tiny.safetensors"
    addp.save_checkpoint(path, {"addp": addp.create_model("addp_vit_small"),
                                "tokenizer": addp.create_model("vqgan_small")})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(image).save(d / "digit.png")
    hole = np.zeros((32, 32), dtype=bool)
    hole[9:23, 7:26] = True  # not aligned with the 4-px token cells
    Image.fromarray(np.where(hole, 255, 0).astype(np.uint8)).save(d / "mask.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(d / "black.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(d / "white.png")
    Image.fromarray(np.full((30, 32), 255, np.uint8)).save(d / "small_mask.png")
    (d / "notes.png").write_text("not an image")
    return d, image, hole


def run(ckpt, image, out, *extra):
    return I.cli(["--checkpoint", str(ckpt), "--image", str(image), "--steps", STEPS, "--output", str(out), *extra])


def read(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_inpaint_writes_result_and_side_by_side(ckpt, files, tmp_path, capsys):
    d, image, hole = files
    out = tmp_path / "res.png"
    assert run(ckpt, d / "digit.png", out, "--mask", str(d / "mask.png")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    sbs = tmp_path / "res_side_by_side.png"
    assert summary["output"] == str(out) and summary["side_by_side"] == str(sbs)
    assert summary["mode"] == "inpaint" and summary["hole_pixels"] == int(hole.sum())
    result = read(out)
    assert result.shape == image.shape
    assert np.array_equal(result[~hole], image[~hole])  # known pixels: the input, bit for bit
    assert not np.array_equal(result[hole], image[hole])
    both = read(sbs)
    assert both.shape == (32, 2 * 32 + I.GAP, 3)
    left, right = both[:, :32], both[:, 32 + I.GAP:]
    assert np.array_equal(right, result)
    assert np.array_equal(left[~hole], image[~hole]) and (left[hole] == I.HOLE_GREY).all()
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_same_seed_same_result(ckpt, files, tmp_path):
    d, _, _ = files
    for name in ("a.png", "b.png"):
        assert run(ckpt, d / "digit.png", tmp_path / name, "--mask", str(d / "mask.png"), "--seed", "3") == 0
    assert np.array_equal(read(tmp_path / "a.png"), read(tmp_path / "b.png"))


def test_default_output_in_current_folder(ckpt, files, tmp_path, monkeypatch):
    d, _, _ = files
    monkeypatch.chdir(tmp_path)
    assert I.cli(["--checkpoint", str(ckpt), "--image", str(d / "digit.png"), "--mask", str(d / "mask.png"),
                  "--steps", STEPS]) == 0
    assert (tmp_path / "digit_inpainted.png").exists()
    assert (tmp_path / "digit_inpainted_side_by_side.png").exists()


def test_outpaint_grows_by_margins(ckpt, files, tmp_path):
    d, image, _ = files
    out = tmp_path / "wide.png"
    assert run(ckpt, d / "digit.png", out, "--left", "5", "--right", "3", "--top", "2") == 0
    result = read(out)
    assert result.shape == (32 + 2, 32 + 5 + 3, 3)
    assert np.array_equal(result[2:34, 5:37], image)
    both = read(tmp_path / "wide_side_by_side.png")
    assert both.shape == (34, 2 * 40 + I.GAP, 3)
    left = both[:, :40]
    assert np.array_equal(left[2:34, 5:37], image)  # the input, at its place on the result's canvas
    assert (left[:2] == I.HOLE_GREY).all() and (left[:, :5] == I.HOLE_GREY).all() and (left[:, 37:] == I.HOLE_GREY).all()


def test_uncrop(ckpt, files, tmp_path, capsys):
    d, _, _ = files
    out = tmp_path / "un.png"
    assert run(ckpt, d / "digit.png", out, "--uncrop", "2") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert read(out).shape == (32, 32, 3)  # the model's size
    assert summary["hole_pixels"] == 32 * 32 - 16 * 16
    both = read(tmp_path / "un_side_by_side.png")
    assert both.shape == (32, 2 * 32 + I.GAP, 3)
    left, right = both[:, :32], both[:, 32 + I.GAP:]
    assert np.array_equal(left[8:24, 8:24], right[8:24, 8:24])  # the known centre, as the result holds it
    assert (left[:8] == I.HOLE_GREY).all()


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


@pytest.mark.parametrize("args,match", [
    ([], "exactly one of"),  # no mode
    (["--mask", "{d}/mask.png", "--left", "4"], "exactly one of"),
    (["--uncrop", "2", "--top", "4"], "exactly one of"),
    (["--mask", "{d}/small_mask.png"], "mask size"),
    (["--mask", "{d}/black.png"], "all black"),
    (["--mask", "{d}/white.png"], "all white"),
    (["--mask", "{d}/notes.png"], "not a readable image"),
    (["--mask", "{d}/missing.png"], "not found"),
    (["--left", "0"], "margin"),
    (["--left", "-3"], "margin"),
    (["--uncrop", "0.5"], "uncrop"),
    (["--mask", "{d}/mask.png", "--steps", "0"], "steps"),
])
def test_bad_options_are_one_line_errors(ckpt, files, tmp_path, capsys, args, match):
    d, _, _ = files
    args = [a.format(d=d) for a in args]
    assert run(ckpt, d / "digit.png", tmp_path / "o.png", *args) == 2
    assert match in one_line_error(capsys)
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("name,match", [("missing.png", "not found"), ("notes.png", "not a readable image")])
def test_bad_image(ckpt, files, tmp_path, capsys, name, match):
    d, _, _ = files
    assert run(ckpt, d / name, tmp_path / "o.png", "--mask", str(d / "mask.png")) == 2
    assert match in one_line_error(capsys)


def test_unwritable_output_folder(ckpt, files, tmp_path, capsys):
    d, _, _ = files
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run(ckpt, d / "digit.png", blocker / "sub" / "o.png", "--mask", str(d / "mask.png")) == 2
    assert "cannot write to output folder" in one_line_error(capsys)
    assert run(ckpt, d / "digit.png", tmp_path, "--mask", str(d / "mask.png")) == 2
    assert "is a folder" in one_line_error(capsys)


def test_checkpoint_without_tokenizer(files, tmp_path, capsys):
    d, _, _ = files
    path = tmp_path / "net.safetensors"
    addp.save_checkpoint(path, {"addp": addp.create_model("addp_vit_small")})
    assert run(path, d / "digit.png", tmp_path / "o.png", "--mask", str(d / "mask.png")) == 2
    assert "tokenizer" in one_line_error(capsys)


def test_bf16_precision_keeps_the_known_pixels(ckpt, files, tmp_path):
    d, image, hole = files
    out16, out32 = tmp_path / "bf16.png", tmp_path / "fp32.png"
    assert run(ckpt, d / "digit.png", out16, "--mask", str(d / "mask.png"), "--precision", "bf16") == 0
    assert run(ckpt, d / "digit.png", out32, "--mask", str(d / "mask.png"), "--precision", "fp32") == 0
    bf16, fp32 = read(out16), read(out32)
    assert np.array_equal(bf16[~hole], image[~hole])
    assert not np.array_equal(bf16[hole], fp32[hole])  # the networks did run in bf16
