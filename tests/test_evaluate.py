"""`python -m addp.evaluate` with a tiny classifier as torch-fidelity's feature extractor."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("torch_fidelity")

import addp  # noqa: E402
from addp import evaluate as E  # noqa: E402


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory):
    from addp import classifier  # noqa: F401  (registers the classifier presets)
    torch.manual_seed(0)
    model = addp.create_model("vit_small_cls", depth=1)
    path = tmp_path_factory.mktemp("clf") / "classifier.safetensors"
    addp.save_checkpoint(path, {"classifier": model})
    return path


def write_folder(folder, images):
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:06d}.png")
    Image.fromarray(images[0]).save(folder / "grid.png")  # not a sample: must be ignored
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    digits = (E.load_images("digits")[:40].permute(0, 2, 3, 1).numpy())
    noise = rng.integers(0, 256, size=(40, 32, 32, 3), dtype=np.uint8)
    return write_folder(d / "a", digits), write_folder(d / "a2", digits), write_folder(d / "b", noise)


def test_fid_zero_for_identical_positive_for_different(folders, classifier_path, capsys):
    a, a2, b = folders
    assert E.cli(["--samples", str(a), "--reference", str(a2), "--feature-extractor", str(classifier_path)]) == 0
    same = json.loads(capsys.readouterr().out)
    assert abs(same["frechet_inception_distance"]) < 1e-3 and same["num_samples"] == 40
    assert 0.1 <= same["mean_max_prob"] <= 1
    assert E.cli(["--samples", str(b), "--reference", str(a), "--feature-extractor", str(classifier_path),
                  "--metrics", "fid,kid,isc,prc"]) == 0
    diff = json.loads(capsys.readouterr().out)
    assert diff["frechet_inception_distance"] > 1e-2
    assert {"kernel_inception_distance_mean", "inception_score_mean", "precision", "recall"} <= set(diff)


def test_npz_and_digits_inputs(folders, tmp_path):
    a, _, _ = folders
    arr = E.load_images(str(a)).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "s.npz", arr_0=arr)
    assert torch.equal(E.load_images(str(tmp_path / "s.npz")), E.load_images(str(a)))
    digits = E.load_images("digits")
    assert digits.shape == (359, 3, 32, 32) and digits.dtype == torch.uint8


def test_no_inception_weights_is_one_line_error(folders, tmp_path, monkeypatch, capsys):
    a, a2, _ = folders
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert E.cli(["--samples", str(a), "--reference", str(a2)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no Inception weights") and "--inception-weights" in err and "\n" not in err


def test_bad_inputs(folders, classifier_path, tmp_path, capsys):
    a, _, _ = folders
    (tmp_path / "empty").mkdir()
    for argv, match in [(["--samples", str(tmp_path / "empty")], "no png"),
                        (["--samples", str(tmp_path / "nope")], "does not exist"),
                        (["--samples", str(a), "--metrics", "fid,xyz"], "unknown metrics")]:
        assert E.cli(argv + ["--reference", str(a), "--feature-extractor", str(classifier_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and "\n" not in err
