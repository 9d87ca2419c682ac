"""Classifiers in timm's layout, and the ADDP encoder -> classifier conversion."""
import json
from pathlib import Path

import pytest
import torch

import addp
from conftest import addp_small_with_visible_norms
from addp.models import classifier as C
from addp.models.checkpoint import CheckpointError
from addp.models.registry import AddpError

OFFICIAL = Path(__file__).parents[1] / "data" / "official_keys"


pytestmark = pytest.mark.usefixtures("one_thread")


def layout(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("size", ["base", "large"])
def test_layout_is_the_official_finetune_one(size):
    data = json.loads((OFFICIAL / f"vit_finetune_{size}_patch16.json").read_text())
    official = {k: tuple(v) for k, v in data["keys"].items()}
    with torch.device("meta"):
        plain = addp.create_model(f"vit_{size}_patch16_cls", pre_norm=False)
        pre = addp.create_model(f"vit_{size}_patch16_cls")
    assert layout(plain) == official
    # pre_norm: + norm_pre (ADDP's tokenizer_norm), - the patch bias (folded into pos_embed)
    expected = {k: v for k, v in official.items() if k != "patch_embed.proj.bias"}
    width = official["cls_token"][-1]
    expected.update({"norm_pre.weight": (width,), "norm_pre.bias": (width,)})
    assert layout(pre) == expected


def small_pair(global_pool="avg", **kw):
    net = addp_small_with_visible_norms()
    state = C.encoder_state_from_addp(net, global_pool=global_pool, **kw)
    cls = addp.create_model("vit_small_cls", global_pool=global_pool, **kw)
    return net, C.load_encoder_state(cls, state, "test").eval()


def test_token_features_are_the_addp_encoder_features():
    net, cls = small_pair("token")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        tokens = cls.forward_tokens(x)
        assert (tokens[:, 1:] - net.forward_encoder(x)).abs().max() < 1e-5
        assert torch.equal(cls.forward_features(x), tokens[:, 0])
        assert cls(x).shape == (4, 10)


def test_avg_features_pool_the_addp_blocks_then_apply_its_norm():
    net, cls = small_pair("avg")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        h = (x - net.pixel_mean) / net.pixel_std
        h = net.patch_embed(h) + net.pos_embed[:, 1:]
        h = torch.cat([(net.cls_token + net.pos_embed[:, :1]).expand(4, -1, -1), h], 1)
        h = net.tokenizer_norm(h)
        for blk in net.blocks:
            h = blk(h)
        expected = net.norm(h[:, 1:].mean(1))
        assert (cls.forward_features(x) - expected).abs().max() < 1e-5
        assert cls.forward_features(x).shape == (4, 64)


def test_position_embeddings_are_interpolated_to_a_new_size():
    net, _ = small_pair()
    state = C.encoder_state_from_addp(net, image_size=48)
    assert state["pos_embed"].shape == (1, 1 + 12 * 12, 64)
    cls = C.load_encoder_state(addp.create_model("vit_small_cls", image_size=48), state, "test").eval()
    with torch.no_grad():
        assert cls(torch.rand(2, 3, 48, 48)).shape == (2, 10)
    # the cls position is kept as it is
    assert torch.equal(state["pos_embed"][:, 0], net.pos_embed[:, 0])


def one_line(excinfo):
    return "\n" not in str(excinfo.value)


def test_wrong_sizes_are_one_line_errors():
    net, cls = small_pair()
    with pytest.raises(AddpError, match="do not fit vit_small_cls") as e:
        cls(torch.rand(1, 3, 40, 40))
    assert one_line(e)
    with pytest.raises(AddpError, match="not a multiple of the encoder's patch size 4") as e:
        C.encoder_state_from_addp(net, image_size=30)
    assert one_line(e)
    wide = addp.create_model("vit_small_cls", embed_dim=32, num_heads=2)
    with pytest.raises(CheckpointError, match="does not fit") as e:
        C.load_encoder_state(wide, C.encoder_state_from_addp(net), "addp.safetensors")
    assert one_line(e)
    with pytest.raises(CheckpointError, match="no ADDP encoder") as e:
        C.encoder_state_from_addp(addp.create_model("vqgan_small").state_dict())
    assert one_line(e)


def test_classifier_round_trips_through_our_checkpoint_format(tmp_path):
    _, cls = small_pair()
    path = addp.save_checkpoint(tmp_path / "classifier.safetensors", cls)
    loaded = addp.load_checkpoint(path, component="classifier").eval()
    assert loaded.config == cls.config
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), cls(x))


def test_intermediates():
    _, cls = small_pair()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        maps = cls.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        assert [m.shape for m in maps] == [(2, 64, 8, 8)] * 2


def test_resnet50_encoder_goes_into_timm_resnet50():
    torch.manual_seed(0)
    net = addp.create_model("addp_resnet50", image_size=64, token_input="none", decoder_embed_dim=32,
                            decoder_depth=1, decoder_num_heads=2).eval()
    state = C.encoder_state_from_addp(net)
    assert "conv1.weight" in state and not any(k.startswith(("encoder.", "decoder")) for k in state)
    cls = C.load_encoder_state(addp.create_model("resnet50_cls", image_size=64, num_classes=7), state, "t").eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        body = net.encoder.body
        expected = body.forward_features((x - net.pixel_mean) / net.pixel_std).mean((2, 3))
        assert (cls.forward_features(x) - expected).abs().max() < 1e-5
        assert cls(x).shape == (2, 7)
