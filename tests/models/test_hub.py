"""Loading by Hub repo id from an offline Hub cache, and save_pretrained folders."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import addp
from addp.models import hub
from addp.models.checkpoint import CheckpointError
from addp.sampling.pipeline import ADDPPipeline
from test_official_layout import fake_state, official_keys, without

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return ADDPPipeline(addp.create_model("addp_vit_small").eval(), addp.create_model("vqgan_small").eval())


def images(pipe, seed=0):
    """Two generated images (a (2, 3, 32, 32) tensor), the same for the same weights and seed."""
    return pipe(num_images=2, num_inference_steps=3, generator=torch.Generator().manual_seed(seed),
                output_type="pt").images


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


# --------------------------------------------------------------------------- save_pretrained
def test_save_pretrained_round_trip_is_bitwise(tmp_path, pipe):
    folder = pipe.save_pretrained(tmp_path / "pipe")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        "addp", "addp/config.json", "addp/model.safetensors", "addp_pipeline.py", "model_index.json",
        "tokenizer", "tokenizer/config.json", "tokenizer/model.safetensors"]
    # the component files are plain state dicts any safetensors reader takes
    assert load_file(folder / "addp" / "model.safetensors").keys() == pipe.net.state_dict().keys()
    loaded = ADDPPipeline.from_pretrained(folder, device="cpu")
    assert_same_weights(loaded.net, pipe.net)
    assert_same_weights(loaded.tokenizer, pipe.tokenizer)
    assert loaded.net.config == pipe.net.config and loaded.tokenizer.config == pipe.tokenizer.config
    assert torch.equal(images(loaded), images(pipe))
    assert set(addp.load_components(folder)) == {"addp", "tokenizer"}
    assert isinstance(addp.load_checkpoint(folder, "tokenizer"), addp.VQTokenizer)


def test_save_pretrained_of_a_classifier_and_the_single_file_format_still_load(tmp_path):
    torch.manual_seed(0)
    cls = addp.create_model("vit_small_cls", num_classes=3).eval()
    folder = addp.save_pretrained(tmp_path / "cls", cls)
    single = addp.save_checkpoint(tmp_path / "cls.safetensors", cls)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        for source in (folder, single):
            loaded = addp.load_checkpoint(source).eval()
            assert loaded.config == cls.config and torch.equal(loaded(x), cls(x))


def test_save_pretrained_rewrites_its_own_files_and_keeps_the_users(tmp_path, pipe, monkeypatch):
    target = tmp_path / "pipe"
    pipe.save_pretrained(target)
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    import addp.models.checkpoint as ckpt

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_safetensors", fail)  # the write dies after model_index.json's folder exists
    with pytest.raises(KeyboardInterrupt):
        pipe.save_pretrained(target)
    monkeypatch.undo()
    assert {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["pipe"]  # no temporary folder left behind
    (target / "README.md").write_text("my notes")
    other = addp.create_model("vqgan_small")
    addp.save_pretrained(target, other)  # our files are replaced, nothing else is deleted
    assert sorted(os.listdir(target)) == ["README.md", "addp", "addp_pipeline.py", "model_index.json", "tokenizer"]
    assert (target / "README.md").read_text() == "my notes"
    assert list(addp.load_components(target)) == ["tokenizer"]  # the index names what was saved
    assert sorted(os.listdir(tmp_path)) == ["pipe"]


def test_save_pretrained_refuses_a_folder_it_did_not_write(tmp_path, pipe):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a save_pretrained folder") as e:
        pipe.save_pretrained(tmp_path / "mine")
    one_line(e)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_broken_folder_is_one_line(tmp_path, pipe):
    folder = pipe.save_pretrained(tmp_path / "pipe")
    (folder / "tokenizer" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="component tokenizer lacks model.safetensors") as e:
        addp.load_components(folder)
    one_line(e)
    (folder / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="not a save_pretrained folder") as e:
        addp.load_components(folder)
    one_line(e)


# --------------------------------------------------------------------------- Hub repo ids
def official_file(tmp_path):
    """addp-vit-base-16.pth as the release lays it out ({"model": state}, the network's keys
    and shapes); zeros but for a few random tensors, to keep it quick."""
    keys = without(official_keys("addp_vit_base_patch16"), "vqgan.", "token_predictor.")
    state = fake_state(keys, zeros=True)
    g = torch.Generator().manual_seed(0)
    for k in ("pos_embed", "blocks.0.attn.qkv.weight", "decoder_pos_mask_embed", "token_emb.weight"):
        state[k] = torch.randn(state[k].shape, generator=g)
    path = tmp_path / "addp-vit-base-16.pth"
    torch.save({"model": state}, path)
    return path, state


def test_repo_id_resolves_an_official_pth_in_the_hub_cache(tmp_path, hub_cache):
    """`Changyao/ADDP` + filename loads the official file as the local path does."""
    path, state = official_file(tmp_path)
    commit = hub_cache("Changyao/ADDP", {"addp-vit-base-16.pth": path, "README.md": b"# ADDP\n"})
    resolved = hub.resolve("Changyao/ADDP", filename="addp-vit-base-16.pth")
    assert resolved.parent.name == commit and resolved.read_bytes() == path.read_bytes()
    by_id = addp.load_checkpoint("Changyao/ADDP", filename="addp-vit-base-16.pth")
    assert isinstance(by_id, addp.ADDP) and by_id.config.embed_dim == 768
    loaded = by_id.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k in loaded)
    assert hub.resolve("Changyao/ADDP", filename="addp-vit-base-16.pth", revision=commit) == resolved


def test_repo_id_resolves_a_save_pretrained_folder(tmp_path, pipe, hub_cache):
    folder = pipe.save_pretrained(tmp_path / "pipe")
    hub_cache("someone/addp-digits", {".": folder, "README.md": b"weights\n"})
    loaded = ADDPPipeline.from_pretrained("someone/addp-digits", device="cpu")
    assert_same_weights(loaded.net, pipe.net)
    assert torch.equal(images(loaded), images(pipe))
    # filename= picks one file of a repo; a tag resolves like a branch
    hub_cache("someone/tok", {"tok.safetensors": addp.save_checkpoint(tmp_path / "t.safetensors", pipe.tokenizer)},
              revision="v1")
    tok = addp.load_checkpoint("someone/tok", filename="tok.safetensors", revision="v1")
    assert_same_weights(tok, pipe.tokenizer)


@pytest.mark.parametrize("repo,filename,expected", [
    ("nobody/nothing", "addp-vit-base-16.pth", "cannot get addp-vit-base-16.pth from the Hub repo nobody/nothing: "
                                               "it is not in the Hub cache"),
    ("Changyao/ADDP", "addp-vit-huge-16.pth", "cannot get addp-vit-huge-16.pth from the Hub repo Changyao/ADDP: "
                                              "it is not in the Hub cache"),
    ("nobody/nothing", None, "cannot get the Hub repo nobody/nothing: it is not in the Hub cache"),
    ("Changyao/ADDP", None, "the Hub repo Changyao/ADDP holds no model_index.json; pass filename="),
])
def test_what_is_not_in_the_cache_is_one_line(hub_cache, repo, filename, expected):
    hub_cache("Changyao/ADDP", {"README.md": b"# ADDP\n"})
    with pytest.raises(CheckpointError) as e:
        addp.load_checkpoint(repo, filename=filename)
    msg = one_line(e)
    assert msg.startswith(expected)
    assert ("HF_HUB_OFFLINE is set" in msg) == ("not in the Hub cache" in msg)


def test_missing_local_paths_are_not_looked_up(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths resolve where nothing is
    for missing in (tmp_path / "nope.safetensors", "ckpts/addp.pth", "../x"):
        with pytest.raises(CheckpointError, match="checkpoint not found") as e:
            addp.load_checkpoint(missing)
        one_line(e)


def test_environment_variables_alone_select_the_cache_and_offline_mode(tmp_path, pipe, hub_cache):
    """A fresh process reads HF_HOME / HF_HUB_OFFLINE from the environment only."""
    hub_cache("someone/tok", {"tok.safetensors": addp.save_checkpoint(tmp_path / "t.safetensors", pipe.tokenizer)})
    code = ("import sys, addp\n"
            "tok = addp.load_checkpoint('someone/tok', filename='tok.safetensors')\n"
            "print(type(tok).__name__)\n"
            "try:\n    addp.load_checkpoint('someone/tok', filename='other.safetensors')\n"
            "except addp.AddpError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_CACHE"}  # HF_HOME/hub is the default cache
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "VQTokenizer"
    assert lines[1].startswith("cannot get other.safetensors from the Hub repo someone/tok") and len(lines) == 2
