"""The ADDP encoders and classifiers as timm models: loading our and the official files, features."""
import pytest
import timm
import torch

import addp
from conftest import addp_small_with_visible_norms
from addp.models import classifier as C
from addp.models import timm_models
from addp.models.registry import AddpError, preset_config
from test_official_layout import fake_state, official_keys, without

pytestmark = pytest.mark.usefixtures("one_thread")


def normalised(x):
    mean, std = torch.tensor(addp.models.addp.IMAGENET_MEAN), torch.tensor(addp.models.addp.IMAGENET_STD)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def net():
    return addp_small_with_visible_norms()


def ours(net, pool="avg", size=32):
    """Our classifier (images in [0, 1]) on the encoder of `net`, without a head."""
    cls = addp.create_model("vit_small_cls", num_classes=0, global_pool=pool, image_size=size)
    return C.load_encoder_state(cls, C.encoder_state_from_addp(net, size, pool), "test").eval()


def blocks_output(net, x):
    """The ADDP encoder's last block output (B, 1 + N, C), written out from its modules."""
    h = net.patch_embed((x - net.pixel_mean) / net.pixel_std) + net.pos_embed[:, 1:]
    h = torch.cat([(net.cls_token + net.pos_embed[:, :1]).expand(x.shape[0], -1, -1), h], 1)
    h = net.tokenizer_norm(h)
    for blk in net.blocks:
        h = blk(h)
    return h


def create(name, file, **kw):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kw).eval()


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_timm_loads_our_checkpoint_and_gives_our_classifier_features(tmp_path, net, pool):
    path = addp.save_checkpoint(tmp_path / "addp.safetensors", {"addp": net, "tokenizer": addp.create_model("vqgan_small")})
    model = create("addp_vit_small", path, global_pool=pool)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert (model(normalised(x)) - ours(net, pool).forward_features(x)).abs().max() <= 1e-5
        if pool == "avg":  # and the ADDP blocks pooled then its final norm, written out
            assert (model(normalised(x)) - net.norm(blocks_output(net, x)[:, 1:].mean(1))).abs().max() <= 1e-5


def test_features_only_gives_the_maps_a_vitdet_neck_takes(tmp_path, net):
    path = addp.save_checkpoint(tmp_path / "addp.safetensors", net)
    x = torch.rand(2, 3, 32, 32)
    three = create("addp_vit_small", path, features_only=True)  # timm's ViT default: the last three blocks
    depth = len(net.blocks)
    assert three.feature_info.channels() == [64] * 3 and three.feature_info.reduction() == [4] * 3
    backbone = create("addp_vit_small", path, features_only=True, out_indices=(-1,))
    assert backbone.feature_info.channels() == [64] and backbone.feature_info.reduction() == [4]
    with torch.no_grad():
        maps = three(normalised(x))
        reference3 = ours(net).forward_intermediates(x, indices=[depth - 3, depth - 2, depth - 1],
                                                     intermediates_only=True)
        assert len(maps) == 3 and all((a - b).abs().max() <= 1e-5 for a, b in zip(maps, reference3))
        (last,) = backbone(normalised(x))
        assert last.shape == (2, 64, 8, 8)  # the last block at stride = patch size
        expected = blocks_output(net, x)[:, 1:].transpose(1, 2).reshape(2, 64, 8, 8)
        assert (last - expected).abs().max() <= 1e-5
        several = create("addp_vit_small", path, features_only=True, out_indices=(1, 3))(normalised(x))
        reference = ours(net).forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert [f.shape for f in several] == [(2, 64, 8, 8)] * 2
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(several, reference))


def test_every_kind_of_addp_file_loads(tmp_path, net):
    """Our single file, a save_pretrained component, an addp.export file; a new image size."""
    from addp import export
    single = addp.save_checkpoint(tmp_path / "addp.safetensors", net)
    folder = addp.save_pretrained(tmp_path / "pipe", {"addp": net})
    exported = tmp_path / "vit.safetensors"
    assert export.cli(["--checkpoint", str(single), "--output", str(exported)]) == 0
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        expected = ours(net, size=48).forward_features(x)
        for file in (single, folder / "addp" / "model.safetensors", exported):
            model = create("addp_vit_small", file, img_size=48)
            assert (model(normalised(x)) - expected).abs().max() <= 1e-5, file


def test_a_finetuned_classifier_loads_with_its_head(tmp_path):
    torch.manual_seed(1)
    cls = addp.create_model("vit_small_cls").eval()
    path = addp.save_checkpoint(tmp_path / "classifier.safetensors", cls)
    model = create("addp_vit_small_cls", path)
    assert model.num_classes == 10
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(normalised(x)) - cls(x)).abs().max() <= 1e-5


def test_official_file_by_hub_id_through_timm(tmp_path, hub_cache):
    """`pretrained=True` alone fetches addp-vit-base-16.pth from Changyao/ADDP (here: the
    offline Hub cache); the features are those of our classifier on the same file."""
    keys = without(official_keys("addp_vit_base_patch16"), "vqgan.", "token_predictor.")
    keys = {k: v for k, v in keys.items() if not k.startswith("decoder_blocks.")}  # unused here: keep it small
    state = fake_state(keys, zeros=True)
    g = torch.Generator().manual_seed(0)
    for k in state:
        if k.startswith(("patch_embed.", "pos_embed", "cls_token", "tokenizer_norm", "blocks.0.", "blocks.11.", "norm.")):
            state[k] = torch.randn(state[k].shape, generator=g) * 0.2 + (1 if k.endswith("norm.weight") else 0)
    path = tmp_path / "addp-vit-base-16.pth"
    torch.save({"model": state}, path)
    hub_cache("Changyao/ADDP", {"addp-vit-base-16.pth": path})
    cfg = timm.models.get_pretrained_cfg("addp_vit_base_patch16")
    assert (cfg.hf_hub_id, cfg.hf_hub_filename, cfg.num_classes) == ("Changyao/ADDP", "addp-vit-base-16.pth", 0)
    model = timm.create_model("addp_vit_base_patch16", pretrained=True).eval()
    cls = C.load_encoder_state(addp.create_model("vit_base_patch16_cls", num_classes=0),
                               C.encoder_state_from_addp(state), "official").eval()
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        assert (model(normalised(x)) - cls.forward_features(x)).abs().max() <= 1e-5
        model.reset_classifier(0, "")
        tokens = model.forward_features(normalised(x))
    assert tokens.shape == (1, 257, 768)


def test_names_cannot_clash_with_our_registry():
    ours_names = set(addp.list_models())
    for name, (preset, _) in timm_models.MODELS.items():
        assert timm.is_model(name) and name.startswith("addp_")
        assert name not in ours_names or name == preset  # the same name is the same model's encoder
        with torch.device("meta"):
            model = timm.create_model(name)
            config = preset_config(preset)
            cls = C.build_classifier(config if config.kind == "classifier" else
                                     C.classifier_config_for(config, num_classes=0))
        assert {k: v.shape for k, v in model.state_dict().items()} == \
               {k: v.shape for k, v in cls.state_dict().items()}
    with pytest.raises(AddpError, match="timm already has a model named vit_base_patch16_224"):
        def vit_base_patch16_224(pretrained=False, **kwargs):
            pass
        timm_models.MODELS["vit_base_patch16_224"] = ("vit_base_patch16_cls", None)
        try:
            timm_models._register(vit_base_patch16_224)
        finally:
            del timm_models.MODELS["vit_base_patch16_224"]


# timm's own checks (timm 1.0.31, tests/test_models.py: test_model_forward_features and
# test_model_forward_intermediates), restated for every addp_* model at a small input size.
@pytest.mark.parametrize("name", sorted(timm.list_models("addp_*")))
def test_timm_forward_features_and_intermediates(name):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    features = timm.create_model(name, pretrained=False, features_only=True, img_size=32).eval()
    channels, reduction = features.feature_info.channels(), features.feature_info.reduction()
    assert len(channels) >= 3  # timm: every model has at least three default feature levels
    with torch.no_grad():
        outputs = features(x)
    assert len(outputs) == len(channels)
    for out, c, r in zip(outputs, channels, reduction):
        assert out.shape[:2] == (2, c) and out.shape[-2:] == (32 // r, 32 // r) and torch.isfinite(out).all()

    model = timm.create_model(name, pretrained=False, img_size=32).eval()
    info = model.feature_info
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x))
    assert len(intermediates) == len(info)
    for out, level in zip(intermediates, info):
        r = level["reduction"]
        assert out.shape[:2] == (2, level["num_chs"]) and out.shape[-2:] == (32 // r, 32 // r)
