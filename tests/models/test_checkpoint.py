"""Our checkpoint format (round trip, atomic writes) and one-line errors on bad files."""
import os
import pickle
import subprocess
import sys

import pytest
import torch

import addp
from conftest import PicklePayload
from addp.models.checkpoint import CheckpointError, atomic_write


def _inputs():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(2, 3, 32, 32, generator=g)
    ids = torch.randint(0, 256, (2, 64), generator=g)
    mask = torch.rand(2, 64, generator=g).argsort(1).argsort(1) < 40
    return img, ids, mask


@pytest.mark.parametrize("name", ["vqgan_small", "mage_vit_small", "addp_vit_small"])
def test_round_trip_gives_identical_outputs(tmp_path, name):
    model = addp.create_model(name).eval()
    path = addp.save_checkpoint(tmp_path / f"{name}.safetensors", model)
    loaded = addp.load_checkpoint(path).eval()
    assert loaded.config == model.config
    img, ids, mask = _inputs()
    if name.startswith("vqgan"):
        assert torch.equal(model.decode_ids(ids), loaded.decode_ids(ids))
    elif name.startswith("mage"):
        assert torch.equal(model(ids, mask), loaded(ids, mask))
    else:
        assert torch.equal(model(img, ids, mask), loaded(img, ids, mask))


def test_one_file_holds_several_components(tmp_path):
    models = {"addp": addp.create_model("addp_vit_small"), "tokenizer": addp.create_model("vqgan_small")}
    path = addp.save_checkpoint(tmp_path / "demo.safetensors", models)
    loaded = addp.load_components(path)
    assert set(loaded) == {"addp", "tokenizer"}
    assert isinstance(addp.load_checkpoint(path), addp.ADDP)
    assert isinstance(addp.load_checkpoint(path, component="tokenizer"), addp.VQTokenizer)
    with pytest.raises(CheckpointError, match="holds no predictor"):
        addp.load_checkpoint(path, component="predictor")


def test_overrides_survive_the_round_trip(tmp_path):
    model = addp.create_model("addp_vit_small", decoder_depth=1, token_input="none")
    loaded = addp.load_checkpoint(addp.save_checkpoint(tmp_path / "m.safetensors", model))
    assert loaded.config.decoder_depth == 1 and loaded.config.token_input == "none"


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = addp.save_checkpoint(tmp_path / "m.safetensors", addp.create_model("vqgan_small"))
    before = path.read_bytes()

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, broken)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no temporary left behind


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as e:
        addp.load_checkpoint(tmp_path / "nope.pth")
    assert "not found" in _one_line(e)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tmp_path, suffix):
    model = addp.create_model("vqgan_small")
    full = tmp_path / f"full{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": model.state_dict()}, full)
    else:
        addp.save_checkpoint(full, model)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        addp.load_checkpoint(cut)
    assert "not a readable" in _one_line(e)


def test_checkpoint_of_another_model_names_the_keys_and_shapes(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    path = addp.save_checkpoint(tmp_path / "p.safetensors", addp.create_model("mage_vit_small", decoder_depth=3))
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    del tensors["predictor.decoder_blocks.2.norm1.weight"]
    tensors["predictor.decoder_embed.weight"] = torch.zeros(32, 64)
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(CheckpointError) as e:
        addp.load_checkpoint(path)
    msg = _one_line(e)
    assert "missing 1 keys (decoder_blocks.2.norm1.weight)" in msg
    assert "decoder_embed.weight: expected (64, 64), found (32, 64)" in msg


def test_official_style_file_of_unknown_layout(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(CheckpointError) as e:
        addp.load_checkpoint(path)
    assert "not an ADDP, MAGE or VQGAN checkpoint" in _one_line(e)


def test_malicious_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": PicklePayload(marker)}, f)
    torch.save({"model": PicklePayload(marker)}, tmp_path / "evil_zip.pth")
    for p in (path, tmp_path / "evil_zip.pth"):
        with pytest.raises(CheckpointError) as e:
            addp.load_checkpoint(p)
        _one_line(e)
    assert not marker.exists()


def test_cli_style_error_is_one_line(tmp_path):
    """The message a user sees from a bad file through a subprocess, not a traceback."""
    code = ("import sys, addp\n"
            "try:\n    addp.load_checkpoint(sys.argv[1])\n"
            "except addp.AddpError as e:\n    print(e); sys.exit(2)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.pth")], capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout.count("\n") == 1 and "Traceback" not in out.stderr
