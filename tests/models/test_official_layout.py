"""Official checkpoints load as they are.

tests/data/official_keys/*.json hold the key names and shapes of the official models, read
from the public MAGE and ADDP code (see the README there). Each test builds a state dict
with exactly those keys and shapes, loads it strictly and runs a forward pass: a drift in
our module names or shapes fails here.
"""
import json
from pathlib import Path

import pytest
import torch

import addp
from addp.models.official import IGNORED_OFFICIAL, components_from_official

DATA = Path(__file__).parents[1] / "data" / "official_keys"


def official_keys(name: str) -> dict[str, tuple]:
    return {k: tuple(v) for k, v in json.loads((DATA / f"{name}.json").read_text())["keys"].items()}


def fake_state(keys: dict[str, tuple], seed: int = 0, zeros: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in keys.items():
        if k.endswith("position_ids"):
            state[k] = torch.arange(shape[-1]).expand(shape).clone()
        else:
            state[k] = torch.zeros(shape) if zeros else torch.randn(shape, generator=g) * 0.02
    return state


def own_layout(model) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def with_prefix(keys, prefix):
    return {k[len(prefix):]: v for k, v in keys.items() if k.startswith(prefix)}


def without(keys, *prefixes):
    return {k: v for k, v in keys.items() if not k.startswith(prefixes)}


def assert_only_ignored_differ(kind, official, ours):
    ignored = {k for k in official if k not in ours}
    assert all(k.startswith(IGNORED_OFFICIAL[kind]) for k in ignored), sorted(ignored)
    assert {k: v for k, v in official.items() if k not in ignored} == ours
    # Every ignore rule still matches something: a renamed official key would show here.
    for prefix in IGNORED_OFFICIAL[kind]:
        assert any(k.startswith(prefix) for k in ignored), prefix


def test_vqgan_layout_is_exactly_the_official_one(tmp_path):
    official = official_keys("vqgan_jax_strongaug")
    assert own_layout(addp.create_model("vqgan_mage")) == official
    state = fake_state(official)
    path = tmp_path / "vqgan_jax_strongaug.ckpt"
    torch.save({"state_dict": state}, path)
    tok = addp.load_checkpoint(path).eval()
    assert isinstance(tok, addp.VQTokenizer)
    assert all(torch.equal(tok.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        ids = tok.encode(torch.rand(1, 3, 256, 256))
        assert ids.shape == (1, 256) and int(ids.max()) < 1024
        assert tok.decode_ids(ids).shape == (1, 3, 256, 256)


@pytest.mark.parametrize("size", ["base", "large"])
def test_mage_predictor_layout(tmp_path, size):
    name = f"mage_vit_{size}_patch16"
    official = official_keys(name)
    assert own_layout(addp.create_model("vqgan_mage")) == with_prefix(official, "vqgan.")
    assert_only_ignored_differ("predictor", without(official, "vqgan."), own_layout(addp.create_model(name)))
    state = fake_state(official, zeros=size == "large")
    if size == "base":  # through a real file, as the release is laid out: {"model": state}
        path = tmp_path / "mage-vitb-1600.pth"
        torch.save({"model": state, "epoch": 1599}, path)
        parts = addp.load_components(path)
    else:
        parts = components_from_official(state)
    assert set(parts) == {"predictor", "tokenizer"}
    pred = parts["predictor"].eval()
    assert pred.config.embed_dim == (768 if size == "base" else 1024)
    assert torch.equal(pred.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    ids, mask = torch.randint(0, 1024, (1, 256)), torch.rand(1, 256) < 0.5
    with torch.no_grad():
        assert pred(ids, mask).shape == (1, 256, 1024)


@pytest.mark.parametrize("size", ["base", "large"])
def test_addp_network_layout(tmp_path, size):
    name = f"addp_vit_{size}_patch16"
    official = official_keys(name)
    net_keys = without(official, "vqgan.", "token_predictor.")
    assert_only_ignored_differ("addp", net_keys, own_layout(addp.create_model(name)))
    assert with_prefix(official, "token_predictor.vqgan.") == with_prefix(official, "vqgan.")
    assert without(with_prefix(official, "token_predictor."), "vqgan.") == \
        without(official_keys(f"mage_vit_{size}_patch16"), "vqgan.")
    if size == "base":
        state = fake_state(official)
        path = tmp_path / "addp-vit-base-16.pth"
        torch.save({"model": state}, path)
        parts = addp.load_components(path)
    else:  # the release may ship without the frozen parts: the network alone must load
        state = fake_state(net_keys, zeros=True)
        parts = components_from_official(state)
    net = parts["addp"].eval()
    assert set(parts) == ({"addp", "tokenizer", "predictor"} if size == "base" else {"addp"})
    assert torch.equal(net.state_dict()["decoder_pos_mask_embed"], state["decoder_pos_mask_embed"])
    ids = torch.randint(0, 1024, (2, 256))
    mask = torch.rand(2, 256).argsort(1).argsort(1) < 200
    with torch.no_grad():
        logits = net(torch.rand(2, 3, 256, 256), ids, mask, num_reliable=56)
    assert logits.shape == (2, 256, 2025)
    if size == "base":  # the official release generates through the pipeline as it is
        from addp.sampling.pipeline import ADDPPipeline
        pipe = ADDPPipeline.from_pretrained(path, device="cpu")
        images, = pipe(num_images=1, num_inference_steps=2, temperature=1.0,
                       generator=torch.Generator().manual_seed(0), output_type="pt", return_dict=False)
        assert images.shape == (1, 3, 256, 256) and 0 <= float(images.min()) <= float(images.max()) <= 1


def test_a_wrong_shape_in_an_official_file_is_named(tmp_path):
    official = official_keys("mage_vit_base_patch16")
    state = fake_state(without(official, "vqgan."))
    state["token_emb.position_embeddings.weight"] = torch.zeros(197, 768)
    del state["decoder_blocks.7.mlp.fc2.bias"]
    path = tmp_path / "mage.pth"
    torch.save({"model": state}, path)
    with pytest.raises(addp.CheckpointError) as e:
        addp.load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert "missing 1 keys (decoder_blocks.7.mlp.fc2.bias)" in msg
    assert "token_emb.position_embeddings.weight: expected (257, 768), found (197, 768)" in msg
