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

    from addp.runtime.precision import resolve_precision
    out = tmp_path / "auto"
    assert run(ckpt, out, 2) == 0
    resolved = resolve_precision("auto", torch.device("cpu"))
    assert json.loads((out / "generate.json").read_text())["precision"] == resolved
    # the same folder with the precision spelled out: the same settings, nothing regenerated
    assert run(ckpt, out, 2, "--precision", resolved) == 0


def png_arrays(out, n):
    from PIL import Image
    return np.stack([np.asarray(Image.open(out / f"{i:06d}.png").convert("RGB")) for i in range(n)])


def test_npz_holds_exactly_the_pngs(ckpt, tmp_path):
    out = tmp_path / "o"
    assert run(ckpt, out, 5) == 0
    with np.load(out / "samples.npz") as z:
        assert z.files == ["arr_0"]
        np.testing.assert_array_equal(z["arr_0"], png_arrays(out, 5))


def test_second_run_into_a_busy_folder_is_refused(ckpt, tmp_path, capsys):
    import os
    import subprocess
    import sys
    import time
    out = tmp_path / "busy"
    first = subprocess.Popen([sys.executable, "-m", "addp.generate", "--checkpoint", str(ckpt), "--num-images",
                              "400", "--batch-size", "2", "--steps", "3", "--seed", "1", "--output-dir", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (out / "000000.png").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second could start"
        before = sorted(p.name for p in out.iterdir() if not p.name.endswith(".tmp"))  # in-flight writes
        assert run(ckpt, out, 4) == 2  # another seed, into the same folder, while the first runs
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and f"process {first.pid}" in err and "\n" not in err
        assert set(before) <= {p.name for p in out.iterdir()}
    finally:
        first.kill()
        first.wait()
    # the first run is gone: its lock is taken over, and the same settings resume its folder
    assert run(ckpt, out, 4, "--seed", "1") == 0


def test_lock_of_a_killed_run_is_gone_with_it(ckpt, tmp_path):
    import subprocess
    import sys
    out = tmp_path / "stale"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from addp.runs.lock import FolderLock; "
                               "FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert run(ckpt, out, 2) == 2
    holder.kill()
    holder.wait()
    assert run(ckpt, out, 2) == 0


def test_checkpoint_replaced_at_the_same_path_is_not_resumed(ckpt, tmp_path, capsys):
    import shutil
    path = tmp_path / "net.safetensors"
    shutil.copy(ckpt, path)
    out = tmp_path / "o"
    assert run(path, out, 2) == 0
    old = png_arrays(out, 2)
    torch.manual_seed(1)
    addp.save_checkpoint(path, {"addp": addp.create_model("addp_vit_small"),
                                "tokenizer": addp.create_model("vqgan_small")})
    capsys.readouterr()
    assert run(path, out, 4) == 2
    err = capsys.readouterr().err
    assert "checkpoint_sha256" in err and "\n" not in err.strip()
    np.testing.assert_array_equal(png_arrays(out, 2), old)
    assert not (out / "000002.png").exists()
    assert run(path, out, 4, "--overwrite") == 0  # restarted: all four from the new network
    fresh = tmp_path / "fresh"
    assert run(path, fresh, 4) == 0
    np.testing.assert_array_equal(png_arrays(out, 4), png_arrays(fresh, 4))


def test_foreign_files_are_neither_adopted_nor_deleted(ckpt, tmp_path, capsys):
    from PIL import Image
    out = tmp_path / "theirs"
    out.mkdir()
    theirs = np.full((32, 32, 3), 7, np.uint8)
    Image.fromarray(theirs).save(out / "000001.png")
    (out / "notes.txt").write_text("mine")
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    for extra in ((), ("--overwrite",)):
        assert run(ckpt, out, 3, *extra) == 2
        err = capsys.readouterr().err.strip()
        assert "000001.png" in err and "did not write" in err and "\n" not in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot
    # images of ours past theirs: 000001.png is outside this run's range and stays untouched
    assert run(ckpt, out, 1) == 0
    assert (out / "000001.png").read_bytes() == snapshot["000001.png"]
    assert np.load(out / "samples.npz")["arr_0"].shape[0] == 1
    # a larger run would adopt it: refused, as is --overwrite, which deletes only our files
    assert run(ckpt, out, 3) == 2
    assert run(ckpt, out, 3, "--seed", "5", "--overwrite") == 2
    assert (out / "000000.png").exists() and (out / "notes.txt").read_text() == "mine"
    (out / "000001.png").unlink()
    assert run(ckpt, out, 1, "--seed", "5", "--overwrite") == 0
    Image.fromarray(theirs).save(out / "000009.png")
    assert run(ckpt, out, 2, "--seed", "6", "--overwrite") == 0
    assert (out / "000009.png").exists() and (out / "notes.txt").exists()
