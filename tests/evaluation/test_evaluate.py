"""`python -m addp.evaluate` with a tiny classifier as torch-fidelity's feature extractor."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("torch_fidelity")

import addp  # noqa: E402
from addp import evaluate as E  # noqa: E402
from addp.evaluation import features as EF, images as EI  # noqa: E402


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """The default statistics cache lives under XDG_CACHE_HOME: keep each test's apart."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory):
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
    digits = (EI.load_images("digits")[:40].permute(0, 2, 3, 1).numpy())
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
    arr = EI.load_images(str(a)).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "s.npz", arr_0=arr)
    assert torch.equal(EI.load_images(str(tmp_path / "s.npz")), EI.load_images(str(a)))
    digits = EI.load_images("digits")
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


def evaluate_json(capsys, *argv):
    capsys.readouterr()
    assert E.cli([str(a) for a in argv]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_reference_statistics_are_cached_and_reused(folders, classifier_path, tmp_path, capsys):
    import os
    import shutil
    a, _, b = folders
    ref = tmp_path / "ref"
    shutil.copytree(a, ref)
    common = ["--samples", b, "--reference", ref, "--feature-extractor", classifier_path,
              "--metrics", "fid,kid,prc", "--stats-cache", tmp_path / "cache"]
    first, log = evaluate_json(capsys, *common)
    assert first["reference_statistics"] == "computed" and "computed from 40 images, cached in" in log
    # garbage of the same size and time in every reference file: only a re-read would notice
    for f in ref.iterdir():
        st = f.stat()
        f.write_bytes(b"\0" * st.st_size)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    second, log = evaluate_json(capsys, *common)
    assert second["reference_statistics"] == "cached" and "reused the cached statistics of 40 images" in log
    for k in ("frechet_inception_distance", "kernel_inception_distance_mean", "precision", "recall"):
        assert second[k] == first[k], k
    assert E.cli([str(c) for c in common] + ["--no-stats-cache"]) == 2  # the files really are garbage now
    assert "not a readable image" in capsys.readouterr().err
    # another preprocessing is another key
    third, _ = evaluate_json(capsys, *common[:3], a, *common[4:], "--preprocess", "adm")
    assert third["reference_statistics"] == "computed"


def test_metrics_match_torch_fidelity_on_the_same_images(folders, classifier_path, tmp_path, capsys):
    import torch_fidelity
    a, _, b = folders
    ours, _ = evaluate_json(capsys, "--samples", b, "--reference", a, "--feature-extractor", classifier_path,
                            "--metrics", "fid,kid,prc,isc", "--no-stats-cache")
    theirs = torch_fidelity.calculate_metrics(
        input1=EI.ImagesDataset(EI.load_images(str(b))), input2=EI.ImagesDataset(EI.load_images(str(a))),
        feature_extractor=EF.register_classifier(EF.load_classifier(classifier_path)), cuda=False, verbose=False,
        fid=True, kid=True, prc=True, isc=True, kid_subset_size=40, isc_splits=10, save_cpu_ram=True)
    for k, v in theirs.items():
        assert ours[k] == pytest.approx(float(v), rel=1e-6, abs=1e-9), k


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_features_equal_torch_fidelity_loop(folders, classifier_path, batch_size):
    """Our preallocated feature loop gives what torch-fidelity's per-batch loop gives,
    partial last batch included."""
    from torch_fidelity.utils import get_featuresdict_from_dataset
    ds = EI.open_images(str(folders[0]))
    features = EF.Features(("fid", "isc"), EF.load_classifier(classifier_path))
    ours = features(ds, batch_size)
    theirs = get_featuresdict_from_dataset(ds, features.extractor, batch_size, False, True, False)
    assert sorted(ours) == sorted(theirs) == ["features", "logits"]
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k


def test_statistics_files_written_and_read(folders, classifier_path, tmp_path, capsys):
    a, _, b = folders
    stats = tmp_path / "ref_stats.npz"
    clf = ["--feature-extractor", classifier_path, "--no-stats-cache"]
    # statistics alone (no samples): the size the reference is prepared at must be given
    only, _ = evaluate_json(capsys, "--reference", a, "--image-size", "32", "--save-reference-stats", stats, *clf)
    assert only["saved_reference_statistics"] == str(stats)
    with np.load(stats) as z:
        assert {"mu", "sigma", "features", "num_images", "image_size"} <= set(z.files)
        assert z["mu"].shape == (64,) and z["sigma"].shape == (64, 64) and z["features"].shape == (40, 64)
    from_folder, _ = evaluate_json(capsys, "--samples", b, "--reference", a, "--metrics", "fid,kid,prc", *clf)
    from_file, log = evaluate_json(capsys, "--samples", b, "--reference", stats, "--metrics", "fid,kid,prc", *clf)
    assert from_file["reference_statistics"] == "file" and "read from" in log
    for k in ("frechet_inception_distance", "kernel_inception_distance_mean", "precision", "recall"):
        assert from_file[k] == from_folder[k], k
    # ADM's convention: mu and sigma only (its images too, which FID does not need)
    with np.load(stats) as z:
        adm = tmp_path / "adm.npz"
        np.savez(adm, mu=z["mu"], sigma=z["sigma"], arr_0=np.zeros((2, 32, 32, 3), np.uint8))
    from_adm, _ = evaluate_json(capsys, "--samples", b, "--reference", adm, *clf)
    assert from_adm["frechet_inception_distance"] == from_folder["frechet_inception_distance"]
    assert from_adm["num_reference"] is None
    assert E.cli(["--samples", str(b), "--reference", str(adm), "--metrics", "kid", *map(str, clf)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "features" in err and "\n" not in err


def test_reference_folder_with_class_subfolders_is_resized_and_centre_cropped(tmp_path):
    from PIL import Image
    root = tmp_path / "val"
    colour, margin = (200, 40, 90), (0, 255, 0)
    for k, (w, h) in enumerate([(96, 64), (64, 128), (300, 200)]):
        d = root / f"n0{k}"
        d.mkdir(parents=True)
        im = np.zeros((h, w, 3), np.uint8)
        im[:] = margin
        s = min(w, h)
        im[(h - s) // 2:(h + s) // 2, (w - s) // 2:(w + s) // 2] = colour  # the centre square
        Image.fromarray(im).save(d / f"ILSVRC2012_val_{k}.JPEG", quality=100)
    for preprocess in EI.PREPROCESS:
        ds = EI.open_images(str(root), size=32, preprocess=preprocess)
        assert len(ds) == 3
        for i in range(3):
            x = ds[i]
            assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
            inner = x[:, 2:-2, 2:-2].permute(1, 2, 0).int()  # the crop's edge may blend with the margin
            assert (inner - torch.tensor(colour)).abs().max() <= 4, (preprocess, i)


def test_small_fid_samples_are_warned_about(folders, classifier_path, tmp_path, capsys):
    a, _, b = folders
    small, log = evaluate_json(capsys, "--samples", b, "--reference", a, "--feature-extractor", classifier_path)
    assert len(small["warnings"]) == 2 and "FID from 40 sample images" in small["warnings"][0]
    assert log.count("warning: FID from 40") == 2
    digits = EI.load_images("digits")[:100].permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "d.npz", arr_0=digits)
    enough, log = evaluate_json(capsys, "--samples", tmp_path / "d.npz", "--reference", "digits",
                                "--feature-extractor", classifier_path)
    assert enough["warnings"] == [] and "warning" not in log


def test_bad_reference_inputs_are_one_line_and_write_nothing(folders, classifier_path, tmp_path, capsys):
    a, _, _ = folders
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "keys.npz", m=np.zeros(64), s=np.eye(64))
    np.savez(bad / "nosigma.npz", mu=np.zeros(64))
    np.savez(bad / "shapes.npz", mu=np.zeros(64), sigma=np.eye(64)[:, :63])
    np.savez(bad / "dim.npz", mu=np.zeros(32), sigma=np.eye(32))
    np.savez(bad / "nan.npz", mu=np.full(64, np.nan), sigma=np.eye(64))
    np.savez(bad / "res.npz", mu=np.zeros(64), sigma=np.eye(64), image_size=np.array([64, 64]))
    np.savez(bad / "images16.npz", arr_0=np.zeros((5, 16, 16, 3), np.uint8))
    np.savez(bad / "float.npz", arr_0=np.zeros((5, 32, 32, 3), np.float32))
    (bad / "noimages").mkdir()
    (bad / "noimages" / "readme.txt").write_text("x")
    (bad / "notzip.npz").write_bytes(b"not a zip")
    cases = [("keys.npz", "neither statistics ('mu' and 'sigma') nor images"), ("nosigma.npz", "needs 'mu' and 'sigma'"), ("shapes.npz", "(D, D)"), ("dim.npz", "32 features"),
             ("nan.npz", "NaN"), ("res.npz", "64x64"), ("images16.npz", "16x16"), ("float.npz", "uint8"),
             ("noimages", "no png/jpg"), ("notzip.npz", "npz")]
    for name, match in cases:
        out = tmp_path / "result.json"
        saved = tmp_path / "saved.npz"
        argv = ["--samples", str(a), "--reference", str(bad / name), "--feature-extractor", str(classifier_path),
                "--output", str(out), "--save-reference-stats", str(saved), "--stats-cache", str(tmp_path / "c")]
        assert E.cli(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and match in err and "\n" not in err, (name, err)
        assert not out.exists() and not saved.exists()
        assert not [p for p in tmp_path.rglob("*.tmp")]


@pytest.mark.parametrize("count, metric, match", [
    (1, "kid", "kid needs at least 2 sample images, got 1"),
    (1, "fid", "fid needs at least 2 sample images, got 1"),
    (3, "prc", "prc needs at least 4 sample images, got 3"),
])
def test_too_few_samples_for_a_metric_is_one_line_not_nan(folders, classifier_path, tmp_path, capsys,
                                                          count, metric, match):
    a, _, _ = folders
    few = write_folder(tmp_path / "few", EI.load_images("digits")[:count].permute(0, 2, 3, 1).numpy())
    capsys.readouterr()
    assert E.cli(["--samples", str(few), "--reference", str(a), "--metrics", metric,
                  "--feature-extractor", str(classifier_path)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the reference's log line
    assert last == f"error: {match}"
