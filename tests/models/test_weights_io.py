"""The one loader path: every source of weights gets the same checks, and writing is deterministic."""
import json
import os

import pytest
import torch

import addp
from conftest import PicklePayload
from addp.evaluation.extractor_weights import checked_weights
from addp.models.checkpoint import CheckpointError, save_checkpoint
from addp.models.weights_io import read_tensors, save_safetensors


def one_line(excinfo):
    assert "\n" not in str(excinfo.value), str(excinfo.value)


@pytest.fixture
def tiny_folder(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "pipe"
    addp.save_pretrained(folder, {"tokenizer": addp.create_model("vqgan_small")})
    return folder


def test_a_pickle_payload_for_the_feature_extractor_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "weights-inception.pth"
    torch.save({"fc.weight": torch.zeros(2), "x": PicklePayload(marker)}, evil)
    with pytest.raises(CheckpointError, match="other than tensors") as e:
        checked_weights(evil)
    one_line(e)
    assert not marker.exists()


def test_the_feature_extractor_gets_only_tensors(tmp_path):
    good = tmp_path / "w.pth"
    torch.save({"a": torch.arange(3.0)}, good)
    # what torch-fidelity unpickles is our own copy: it loads even with weights_only
    state = torch.load(checked_weights(good), weights_only=True)
    assert torch.equal(state["a"], torch.arange(3.0))


@pytest.mark.parametrize("content, match", [
    ({"a": 1}, "entry 'a' is a int"),
    ([torch.zeros(1)], "holds a list"),
    ({"a": torch.tensor([float("nan")])}, "non-finite"),
    ({"model": {"w": torch.tensor([float("inf")])}}, "non-finite"),
])
def test_crafted_torch_files_are_one_line(tmp_path, content, match):
    path = tmp_path / "x.pth"
    torch.save(content, path)
    for load in (read_tensors, checked_weights, addp.load_checkpoint):
        with pytest.raises(CheckpointError, match=match) as e:
            load(path)
        one_line(e)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_non_regular_files_are_refused_without_reading(tmp_path, kind):
    path = tmp_path / "x.pth"
    if kind == "fifo":
        os.mkfifo(path)  # reading it would block forever
    else:
        path.symlink_to("/dev/zero")  # reading it would never end
    for load in (read_tensors, checked_weights, addp.load_checkpoint):
        with pytest.raises(CheckpointError, match="not a regular file") as e:
            load(path)
        one_line(e)


def test_nan_in_a_save_pretrained_folder_is_refused(tiny_folder):
    weights = tiny_folder / "tokenizer" / "model.safetensors"
    state, _ = read_tensors(weights)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    save_safetensors(state, weights, {"format": "pt"})
    with pytest.raises(CheckpointError, match="non-finite") as e:
        addp.load_components(tiny_folder)
    one_line(e)


@pytest.mark.parametrize("name", ["../outside", "/abs/path", "a/../../b"])
def test_component_names_stay_inside_the_folder(tiny_folder, tmp_path, name):
    index = json.loads((tiny_folder / "model_index.json").read_text())
    index[name] = index.pop("tokenizer")
    (tiny_folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a path inside the folder") as e:
        addp.load_components(tiny_folder)
    one_line(e)


@pytest.mark.parametrize("filename", ["../pipe/tokenizer/model.safetensors", "/etc/passwd"])
def test_filename_stays_inside_the_folder(tiny_folder, filename):
    with pytest.raises(CheckpointError, match="not a path inside the folder") as e:
        addp.load_components(tiny_folder, filename=filename)
    one_line(e)
    with pytest.raises(CheckpointError, match="not a path inside the folder"):
        addp.load_components("org/repo", filename=filename)  # the Hub takes the same check


def test_timm_overlay_refuses_nan_weights(tmp_path):
    import timm
    net = addp.create_model("addp_vit_small", depth=1, decoder_depth=1)
    with torch.no_grad():
        net.patch_embed.proj.weight[0, 0, 0, 0] = float("nan")
    path = save_checkpoint(tmp_path / "nan.safetensors", net)
    with pytest.raises(CheckpointError, match="non-finite") as e:
        timm.create_model("addp_vit_small", pretrained=True, depth=1, pretrained_cfg_overlay=dict(file=str(path)))
    one_line(e)


def test_identical_models_give_identical_bytes(tmp_path):
    torch.manual_seed(0)
    models = {"addp": addp.create_model("addp_vit_small", depth=1, decoder_depth=1),
              "tokenizer": addp.create_model("vqgan_small")}
    files = [save_checkpoint(tmp_path / f"{i}.safetensors", models).read_bytes() for i in range(6)]
    assert all(f == files[0] for f in files)
    metadata = {f"k{i}": str(i) for i in range(12)}  # many keys: safetensors alone shuffles them
    for i in range(4):
        save_safetensors({"a": torch.zeros(2)}, tmp_path / f"m{i}.safetensors", metadata)
    assert len({(tmp_path / f"m{i}.safetensors").read_bytes() for i in range(4)}) == 1
    state, meta = read_tensors(tmp_path / "m0.safetensors")
    assert meta == metadata and torch.equal(state["a"], torch.zeros(2))
