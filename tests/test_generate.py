"""`python -m addp.generate` on a tiny random checkpoint: files written, resume, errors."""
import numpy as np
import pytest
import torch

import addp
from addp import generate as G


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gen") / "tiny.safetensors"
    addp.save_checkpoint(path, {"addp": addp.create_model("addp_vit_small"),
                                "tokenizer": addp.create_model("vqgan_small")})
    return path


def run(ckpt, out, n, *extra):
    return G.cli(["--checkpoint", str(ckpt), "--num-images", str(n), "--batch-size", "2", "--steps", "3",
                  "--output-dir", str(out), *extra])


def pngs(out):
    return sorted(p.name for p in out.glob("[0-9]*.png"))


def test_writes_pngs_grid_npz_and_resumes(ckpt, tmp_path, capsys):
    out = tmp_path / "samples"
    assert run(ckpt, out, 5) == 0
    assert pngs(out) == [f"{i:06d}.png" for i in range(5)]
    assert (out / "grid.png").exists()
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (5, 32, 32, 3) and arr.dtype == np.uint8
    before = {p: (out / p).read_bytes() for p in pngs(out)}
    mtimes = {p: (out / p).stat().st_mtime_ns for p in pngs(out)}
    capsys.readouterr()

    assert run(ckpt, out, 5) == 0  # rerun: nothing regenerated
    assert '"generated_now": 0' in capsys.readouterr().out
    assert {p: (out / p).stat().st_mtime_ns for p in pngs(out)} == mtimes

    assert run(ckpt, out, 7) == 0  # more images: only the new ones are made
    assert '"generated_now": 2' in capsys.readouterr().out
    assert all((out / p).read_bytes() == b for p, b in before.items())
    assert np.load(out / "samples.npz")["arr_0"].shape[0] == 7


def test_images_do_not_depend_on_how_many_were_asked(ckpt, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(ckpt, a, 3) == 0 and run(ckpt, b, 6) == 0
    for i in range(3):
        assert (a / f"{i:06d}.png").read_bytes() == (b / f"{i:06d}.png").read_bytes()
    assert (b / "000000.png").read_bytes() != (b / "000002.png").read_bytes()


def test_unwritable_output_folder_is_one_line_error(ckpt, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run(ckpt, blocker / "out", 2) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "cannot write to output folder" in err and "\n" not in err


def test_other_settings_in_same_folder_refused(ckpt, tmp_path, capsys):
    out = tmp_path / "s"
    assert run(ckpt, out, 2) == 0
    assert run(ckpt, out, 2, "--seed", "1") == 2
    assert "seed" in capsys.readouterr().err
    assert run(ckpt, out, 2, "--seed", "1", "--overwrite") == 0


def test_checkpoint_without_tokenizer(tmp_path, capsys):
    path = tmp_path / "net.safetensors"
    addp.save_checkpoint(path, {"addp": addp.create_model("addp_vit_small")})
    assert run(path, tmp_path / "o", 1) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "tokenizer" in err and "\n" not in err


def test_bf16_precision_runs_and_is_a_setting_of_the_folder(ckpt, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert run(ckpt, out, 2, "--precision", "bf16") == 0
    fp32 = tmp_path / "fp32"
    assert run(ckpt, fp32, 2, "--precision", "fp32") == 0
    a, b = (np.load(d / "samples.npz")["arr_0"] for d in (out, fp32))
    assert a.shape == b.shape == (2, 32, 32, 3)
    # the same seed with the networks under bf16 autocast: other images
    assert not np.array_equal(a, b)
    capsys.readouterr()
    assert run(ckpt, out, 2, "--precision", "fp32") == 2  # fp32 into the bf16 folder: refused
    assert "precision" in capsys.readouterr().err


def test_folders_from_before_the_precision_setting_count_as_fp32(ckpt, tmp_path):
    import json
    out = tmp_path / "old"
    assert run(ckpt, out, 2, "--precision", "fp32") == 0
    record = json.loads((out / "generate.json").read_text())
    del record["precision"]
    (out / "generate.json").write_text(json.dumps(record))
    assert run(ckpt, out, 2, "--precision", "fp32") == 0


def test_auto_precision_is_recorded_as_what_it_resolved_to(ckpt, tmp_path):
    import json

    from addp.precision import resolve_precision
    out = tmp_path / "auto"
    assert run(ckpt, out, 2) == 0
    resolved = resolve_precision("auto", torch.device("cpu"))
    assert json.loads((out / "generate.json").read_text())["precision"] == resolved
    # the same folder with the precision spelled out: the same settings, nothing regenerated
    assert run(ckpt, out, 2, "--precision", resolved) == 0
