"""The dense readers: every bad record or image file is one `AddpError` line naming the file and
the record, found when the dataset is built; images are decoded by `runs.images`."""
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from addp.dense.ade import AdeSegmentation
from addp.dense.coco import CocoInstances, check_same_categories
from addp.errors import AddpError
from addp.runs.images import read_rgb

ROOT = Path(__file__).parents[2]


def _coco(root: Path, split: str = "val2017", cats=(1, 2)) -> dict:
    """Two 16x16 images in root/split, one RLE and one polygon annotation; returns the json's data."""
    (root / split).mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (16, 16), (200, 100, 50)).save(root / split / name)
    m = np.zeros((16, 16), np.uint8)
    m[2:10, 3:12] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 16, "height": 16},
                       {"id": 2, "file_name": "b.png", "width": 16, "height": 16}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": cats[0], "iscrowd": 0, "area": 72,
                             "bbox": [3, 2, 9, 8], "segmentation": {"size": [16, 16], "counts": rle["counts"].decode()}},
                            {"id": 2, "image_id": 2, "category_id": cats[1], "iscrowd": 0, "area": 36,
                             "bbox": [4, 4, 6, 6], "segmentation": [[4, 4, 10, 4, 10, 10, 4, 10]]}],
            "categories": [{"id": c, "name": f"c{c}"} for c in cats]}
    _write(root, split, data)
    return data


def _write(root: Path, split: str, data) -> Path:
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(data))  # NaN and Infinity are written as JSON's (non-standard) literals
    return path


def _set(kind: str, i: int, **fields):
    """A change of the data: record `i` of list `kind` gets `fields` (KeyError: the key removed)."""
    def change(data):
        for key, value in fields.items():
            if value is KeyError:
                del data[kind][i][key]
            else:
                data[kind][i][key] = value
        return data
    return change


def _ann(i, **fields):
    return _set("annotations", i, **fields)


def _img(i, **fields):
    return _set("images", i, **fields)


A0, A1, I0 = "annotations[0] (id 1)", "annotations[1] (id 2)", "images[0] (id 1)"
BAD_JSON = {  # case: (change of the data, the record named, a phrase of the message)
    "list-not-object": (lambda d: [d], None, "this is a JSON list"),
    "no-annotations": (lambda d: {k: v for k, v in d.items() if k != "annotations"}, None, "a JSON object without annotations"),
    "no-bbox": (_ann(0, bbox=KeyError), A0, "has no bbox"),
    "bbox-string": (_ann(0, bbox="3 2 9 8"), A0, "bbox must be 4 finite numbers"),
    "bbox-null": (_ann(0, bbox=None), A0, "bbox must be 4 finite numbers"),
    "bbox-3-numbers": (_ann(0, bbox=[3, 2, 9]), A0, "bbox must be 4 finite numbers"),
    "bbox-nan": (_ann(0, bbox=[math.nan, 2, 9, 8]), A0, "bbox must be 4 finite numbers"),
    "bbox-infinite-width": (_ann(1, bbox=[4, 4, math.inf, 6]), A1, "bbox must be 4 finite numbers"),
    "rle-size-strings": (_ann(0, segmentation={"size": ["16", "16"], "counts": "x"}), A0, "RLE size must be 2 integers"),
    "rle-size-not-image": (_ann(0, segmentation={"size": [32, 32], "counts": "x"}), A0,
                           "RLE size 32x32 (width x height) differs from its image's 16x16"),
    "odd-polygon": (_ann(1, segmentation=[[4, 4, 10, 4, 10, 10, 4]]), A1, "polygon 0 must be x, y pairs"),
    "image-without-height": (_img(0, height=KeyError), I0, "height must be a positive integer"),
    "numeric-file-name": (_img(0, file_name=7), I0, "file_name must be a file name"),
    "file-name-dotdot": (_img(0, file_name="../val2017/a.png"), I0, "leaves the image folder"),
    "file-name-absolute": (_img(0, file_name="/etc/hostname"), I0, "leaves the image folder"),
    "unknown-category": (_ann(1, category_id=9), A1, "has unknown category 9"),
}


@pytest.mark.parametrize("case", list(BAD_JSON))
def test_bad_coco_record_is_one_line_naming_file_and_record(case, tmp_path):
    change, record, phrase = BAD_JSON[case]
    path = _write(tmp_path, "val2017", change(_coco(tmp_path)))
    with pytest.raises(AddpError) as e:
        CocoInstances(tmp_path, "val2017", 16)
    message = str(e.value)
    assert str(path) in message and phrase in message and len(message.splitlines()) == 1, message
    if record:
        assert record in message, message


def _corrupt(path: Path):
    path.write_bytes(b"\x89PNG\r\n\x1a\n not a png at all")


def _truncated(path: Path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-40])


@pytest.mark.parametrize("case", ["corrupt", "bomb", "truncated", "other-size"])
def test_bad_coco_image_is_one_line_naming_the_file(case, tmp_path, monkeypatch):
    _coco(tmp_path)
    file = tmp_path / "val2017" / "b.png"
    if case == "corrupt":
        _corrupt(file)
    elif case == "bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 16 x 16 is beyond it
    elif case == "truncated":
        _truncated(file)  # its header is fine: refused when decoded
    else:
        Image.new("RGB", (16, 12)).save(file)
    with pytest.raises(AddpError) as e:
        CocoInstances(tmp_path, "val2017", 16)[1]
    message = str(e.value)
    assert str(file if case != "bomb" else tmp_path / "val2017" / "a.png") in message, message
    assert len(message.splitlines()) == 1
    if case in ("corrupt", "other-size"):
        assert "images[1] (id 2)" in message, message


def test_sixteen_bit_grey_is_read_at_its_scale(tmp_path):
    _coco(tmp_path)
    grey = np.linspace(1000, 60000, 256).reshape(16, 16).astype(np.uint16)
    file = tmp_path / "val2017" / "a.png"
    Image.fromarray(grey).save(file)
    image, _, _ = CocoInstances(tmp_path, "val2017", 16)[0]
    expected = torch.from_numpy(np.asarray(read_rgb(file)).copy()).permute(2, 0, 1).float() / 255
    assert torch.allclose(image, expected)
    assert image[0].flatten()[[0, -1]].tolist() == pytest.approx([4 / 255, 233 / 255])  # 1000, 60000 of 65535
    clipped = np.asarray(Image.open(file).convert("RGB"))
    assert (clipped == 255).mean() > 0.9  # what a plain convert("RGB") would have given


def test_train_and_val_categories_must_match(tmp_path):
    _coco(tmp_path, "train2017", cats=(1, 2))
    _coco(tmp_path, "val2017", cats=(1, 3))
    train, val = CocoInstances(tmp_path, "train2017", 16), CocoInstances(tmp_path, "val2017", 16)
    with pytest.raises(AddpError) as e:
        check_same_categories(train, val)
    message = str(e.value)
    assert str(train.path) in message and str(val.path) in message and "[1, 2]" in message and "[1, 3]" in message
    check_same_categories(train, CocoInstances(tmp_path, "train2017", 16))


# -- ADE20k ------------------------------------------------------------------------------------
def _ade(root: Path) -> tuple[Path, Path]:
    for d in ("images/validation", "annotations/validation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "images/validation/a.png")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(root / "annotations/validation/a.png")
    return root / "images/validation/a.png", root / "annotations/validation/a.png"


@pytest.mark.parametrize("case", ["rgb-annotation", "jpeg-annotation", "float-annotation", "corrupt-image",
                                  "corrupt-annotation"])
def test_bad_ade_file_is_one_line_naming_it(case, tmp_path):
    image, label = _ade(tmp_path)
    named = label
    if case == "rgb-annotation":
        Image.new("RGB", (8, 8)).save(label)
    elif case == "jpeg-annotation":
        Image.new("L", (8, 8)).save(label, format="JPEG")
    elif case == "float-annotation":
        Image.fromarray(np.ones((8, 8), np.float32)).save(label, format="TIFF")
    elif case == "corrupt-image":
        _corrupt(image)
        named = image
    else:
        _corrupt(label)
    with pytest.raises(AddpError) as e:
        AdeSegmentation(tmp_path, "validation", 3, 8)
    message = str(e.value)
    assert str(named) in message and len(message.splitlines()) == 1, message
    if case.endswith("-annotation") and case != "corrupt-annotation":
        assert "one-channel integer PNG" in message


def test_ade_reads_16_bit_images_and_labels_as_stored(tmp_path):
    image, label = _ade(tmp_path)
    Image.fromarray(np.linspace(0, 65535, 64).reshape(8, 8).astype(np.uint16)).save(image)
    Image.fromarray(np.full((8, 8), 3, np.uint16)).save(label)  # a 16-bit label map: values as stored
    picture, labels, _ = AdeSegmentation(tmp_path, "validation", 3, 8)[0]
    expected = torch.from_numpy(np.asarray(read_rgb(image)).copy()).permute(2, 0, 1).float() / 255
    assert torch.allclose(picture, expected) and picture.max() == 1 and picture.min() == 0
    assert labels.unique().tolist() == [2]


# -- the command -------------------------------------------------------------------------------
def _detect(data: Path, out: Path):
    run = subprocess.run([sys.executable, "-m", "addp.detect", "--data-path", str(data), "--output-dir", str(out),
                          "--steps", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return run.returncode, run.stderr


@pytest.mark.parametrize("case", ["bbox-nan", "categories-differ"])
def test_detect_refuses_in_one_line_and_writes_nothing(case, tmp_path):
    data, out = tmp_path / "coco", tmp_path / "out"
    _coco(data, "train2017")
    if case == "bbox-nan":
        _write(data, "train2017", _ann(0, bbox=[math.nan, 2, 9, 8])(_coco(data, "val2017")))
        expected = "instances_train2017.json: annotations[0] (id 1): bbox must be 4 finite numbers"
    else:
        _coco(data, "val2017", cats=(1, 3))
        expected = "the category ids of"
    out.mkdir()
    (out / "kept.txt").write_text("there before")
    code, err = _detect(data, out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert expected in err
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt"]


def test_polygons_of_fewer_than_three_points_are_left_out_of_the_mask(tmp_path, caplog):
    from addp.dense.coco import read_coco
    data = _coco(tmp_path)
    square = data["annotations"][1]["segmentation"][0]
    data["annotations"][1]["segmentation"] = [square, [1, 1, 2, 2]]  # a 2-point polygon beside the square
    data["annotations"][0]["segmentation"] = [[5, 5, 6, 6]]  # only a 2-point polygon: an empty mask
    _write(tmp_path, "val2017", data)
    logger = logging.getLogger("addp.dense.coco")  # a command run in-process may stop "addp" propagating
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="addp.dense.coco"):
            coco = read_coco(tmp_path, "val2017")
    finally:
        logger.removeHandler(caplog.handler)
    assert "2 polygons of fewer than 3 points" in caplog.text
    assert coco.annToMask(coco.anns[1]).sum() == 0
    reference = mask_utils.decode(mask_utils.frPyObjects([square], 16, 16)).max(-1)
    assert np.array_equal(coco.annToMask(coco.anns[2]), reference)
