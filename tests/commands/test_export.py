"""`python -m addp.export --format timm`: the file timm itself loads gives our features."""
import pytest
import timm
import torch
from safetensors.torch import load_file

import addp
from addp.models import classifier as C
from addp import export

SMALL = dict(patch_size=4, embed_dim=64, depth=4, num_heads=4)  # addp_vit_small's encoder


pytestmark = pytest.mark.usefixtures("one_thread")


def addp_file(tmp_path):
    torch.manual_seed(0)
    net = addp.create_model("addp_vit_small").eval()
    with torch.no_grad():
        net.patch_embed.proj.bias.normal_(0, 0.5)
        net.tokenizer_norm.weight.normal_(1, 0.2)
        net.norm.bias.normal_(0, 0.2)
    parts = {"addp": net, "tokenizer": addp.create_model("vqgan_small")}
    return net, addp.save_checkpoint(tmp_path / "addp.safetensors", parts)


def timm_vit(file, overlay=None, **kw):
    return timm.create_model("vit_small_patch16_224", pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(file), **(overlay or {})),
                             pre_norm=True, **SMALL, **kw).eval()


def normalised(x):
    mean, std = torch.tensor(addp.models.addp.IMAGENET_MEAN), torch.tensor(addp.models.addp.IMAGENET_STD)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


@pytest.mark.parametrize("pool,size", [("avg", 32), ("token", 32), ("avg", 48)])
def test_timm_loads_the_export_and_gives_our_features(tmp_path, pool, size):
    net, path = addp_file(tmp_path)
    out = tmp_path / "vit.safetensors"
    assert export.cli(["--checkpoint", str(path), "--output", str(out), "--global-pool", pool,
                       "--img-size", str(size)]) == 0
    model = timm_vit(out, img_size=size, global_pool=pool, num_classes=0)
    assert set(load_file(out)) == set(model.state_dict())  # every key used, none left over
    ours = C.load_encoder_state(addp.create_model("vit_small_cls", image_size=size, global_pool=pool, num_classes=0),
                                C.encoder_state_from_addp(net, size, pool), "test").eval()
    x = torch.rand(3, 3, size, size)
    with torch.no_grad():
        assert (model(normalised(x)) - ours.forward_features(x)).abs().max() <= 1e-5
    features = timm_vit(out, img_size=size, global_pool=pool, features_only=True, out_indices=(1, 3))
    with torch.no_grad():
        assert [f.shape[1:] for f in features(normalised(x))] == [(64, size // 4, size // 4)] * 2


def test_a_finetuned_classifier_exports_with_its_head(tmp_path):
    torch.manual_seed(0)
    cls = addp.create_model("vit_small_cls", num_classes=7).eval()
    path = addp.save_checkpoint(tmp_path / "classifier.safetensors", cls)
    out = tmp_path / "vit.safetensors"
    assert export.cli(["--checkpoint", str(path), "--output", str(out), "--keep-head"]) == 0
    # timm keeps a head only when the pretrained config declares the same class count
    model = timm_vit(out, dict(num_classes=7), img_size=32, global_pool="avg", num_classes=7)
    assert set(load_file(out)) == set(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(normalised(x)) - cls(x)).abs().max() <= 1e-5


def test_resnet50_export_loads_into_timm_resnet50(tmp_path):
    torch.manual_seed(0)
    net = addp.create_model("addp_resnet50", image_size=64, token_input="none", decoder_embed_dim=32,
                            decoder_depth=1, decoder_num_heads=2).eval()
    path = addp.save_checkpoint(tmp_path / "addp_r50.safetensors", net)
    out = tmp_path / "r50.safetensors"
    assert export.cli(["--checkpoint", str(path), "--output", str(out)]) == 0
    model = timm.create_model("resnet50", pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                              num_classes=0).eval()
    assert set(load_file(out)) == set(model.state_dict())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = net.encoder.body.forward_features(normalised(x)).mean((2, 3))
        assert (model(normalised(x)) - expected).abs().max() <= 1e-5


def test_checkpoint_without_encoder_is_a_one_line_error(tmp_path, capsys):
    tok = addp.save_checkpoint(tmp_path / "tok.safetensors", addp.create_model("vqgan_small"))
    out = tmp_path / "x.safetensors"
    assert export.cli(["--checkpoint", str(tok), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no encoder" in err and "\n" not in err and not out.exists()


# --------------------------------------------------------------------------- programs
def ours(net, size=32):
    """Our headless classifier on the encoder of `net` (images in [0, 1])."""
    cls = addp.create_model("vit_small_cls", num_classes=0, image_size=size)
    return C.load_encoder_state(cls, C.encoder_state_from_addp(net, size), "test").eval()


def test_torch_export_round_trip(tmp_path):
    net, path = addp_file(tmp_path)
    out = tmp_path / "vit.pt2"
    assert export.cli(["--checkpoint", str(path), "--format", "torch-export", "--output", str(out)]) == 0
    program = torch.export.load(out).module()
    for batch in (1, 5):  # the batch dimension is dynamic
        x = torch.rand(batch, 3, 32, 32)
        with torch.no_grad():
            y = program(x)
            assert y.shape == (batch, 64) and (y - ours(net).forward_features(x)).abs().max() <= 1e-5


def test_torch_export_of_a_classifier_keeps_its_head(tmp_path):
    torch.manual_seed(0)
    cls = addp.create_model("vit_small_cls", num_classes=7).eval()
    path = addp.save_checkpoint(tmp_path / "classifier.safetensors", cls)
    out = tmp_path / "cls.pt2"
    assert export.cli(["--checkpoint", str(path), "--format", "torch-export", "--output", str(out), "--keep-head"]) == 0
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert (torch.export.load(out).module()(x) - cls(x)).abs().max() <= 1e-5


@pytest.mark.slow
def test_torch_export_of_a_resnet50_encoder_takes_any_image_size(tmp_path):
    torch.manual_seed(0)
    net = addp.create_model("addp_resnet50", image_size=64, token_input="none", decoder_embed_dim=32,
                            decoder_depth=1, decoder_num_heads=2).eval()
    r50 = addp.save_checkpoint(tmp_path / "addp_r50.safetensors", net)
    out = tmp_path / "r50.pt2"
    assert export.cli(["--checkpoint", str(r50), "--format", "torch-export", "--output", str(out),
                       "--img-size", "64"]) == 0
    program = torch.export.load(out).module()
    for size in (64, 96):
        x = torch.rand(2, 3, size, size)
        with torch.no_grad():
            expected = net.encoder.body.forward_features(normalised(x)).mean((2, 3))
            assert (program(x) - expected).abs().max() <= 1e-5


@pytest.mark.slow
def test_onnx_round_trip(tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs onnx and onnxscript (pip install addp[onnx])")
    ort = pytest.importorskip("onnxruntime", reason="running the ONNX file needs onnxruntime")
    net, path = addp_file(tmp_path)
    out = tmp_path / "vit.onnx"
    assert export.cli(["--checkpoint", str(path), "--format", "onnx", "--output", str(out)]) == 0
    session = ort.InferenceSession(str(out))
    x = torch.rand(4, 3, 32, 32)
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert (torch.from_numpy(y) - ours(net).forward_features(x)).abs().max() <= 1e-5


def test_a_program_that_differs_from_eager_is_never_written(tmp_path, monkeypatch, capsys):
    net, path = addp_file(tmp_path)
    out = tmp_path / "vit.pt2"
    out.write_bytes(b"previous")
    monkeypatch.setattr(export, "CHECK_TOLERANCE", -1.0)  # every program now counts as different
    assert export.cli(["--checkpoint", str(path), "--format", "torch-export", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the exported program differs from the eager model") and "\n" not in err
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["addp.safetensors",
                                                                                             "vit.pt2"]
