"""Fine-tuning / linear probing: the recipe's parts, exact resume, bad input, it learns."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import addp
from addp.training import finetune_data, finetune_engine, finetuning
from addp import finetune
from addp.models.classifier import encoder_state_from_addp, load_encoder_state

OFFICIAL = Path(__file__).parents[1] / "data" / "official_keys"


pytestmark = pytest.mark.usefixtures("one_thread")


def args_for(tmp_path, *extra):
    return finetune.get_args_parser().parse_args(
        ["--output-dir", str(tmp_path), "--batch-size", "16", "--log-every", "5", *extra])


def small_addp_file(tmp_path) -> Path:
    torch.manual_seed(0)
    return addp.save_checkpoint(tmp_path / "addp.safetensors", {"addp": addp.create_model("addp_vit_small"),
                                                                 "tokenizer": addp.create_model("vqgan_small")})


def test_layer_decay_groups_give_each_block_its_scale():
    model = addp.create_model("vit_small_cls")  # depth 4
    groups = finetuning.ClassifierStage(model, 10, layer_decay=0.5).param_groups(0.05)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    depth = 4
    for name, p in model.named_parameters():
        if name.startswith(("cls_token", "pos_embed", "patch_embed", "norm_pre")):
            expected = 0.5 ** (depth + 1)  # the embedding is "layer 0"
        elif name.startswith("blocks."):
            expected = 0.5 ** (depth - int(name.split(".")[1]))  # block i is layer i + 1
        else:
            expected = 1.0  # fc_norm, head
        assert scale[id(p)] == pytest.approx(expected), name
        no_decay = p.ndim == 1 or name in ("cls_token", "pos_embed")
        assert decay[id(p)] == (0.0 if no_decay else 0.05), name


def test_mixup_cutmix_targets_sum_to_one_and_repeat_per_generator():
    model = addp.create_model("vit_small_cls")
    stage = finetuning.ClassifierStage(model, 10, mixup=0.8, cutmix=1.0, smoothing=0.1)
    images, labels = torch.rand(8, 3, 32, 32), torch.arange(8)
    np_state = np.random.get_state()[1].copy()
    a = stage.prepare(images, torch.Generator().manual_seed(3), labels=labels)
    b = stage.prepare(images, torch.Generator().manual_seed(3), labels=labels)
    assert a["targets"].shape == (8, 10)
    assert torch.allclose(a["targets"].sum(1), torch.ones(8))
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["targets"], b["targets"])
    assert np.array_equal(np.random.get_state()[1], np_state)  # numpy's global RNG untouched
    loss = stage.loss_module(**a)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_labels_per_class_takes_exactly_n_of_each():
    args = args_for(Path("/nonexistent"), "--labels-per-class", "3")
    train, _, _ = finetune_data.build_datasets(args, 32)
    labels = [int(train[i][1]) for i in range(len(train))]
    assert sorted(labels) == sorted(list(range(10)) * 3)


def test_resume_is_bit_exact(tmp_path, monkeypatch):
    ckpt = small_addp_file(tmp_path)
    common = ["--finetune", str(ckpt), "--steps", "8", "--ckpt-every", "4", "--mixup", "0.8", "--cutmix", "1.0",
              "--drop-path", "0.2", "--blr", "1e-2", "--warmup-steps", "2"]
    full = finetune.main(args_for(tmp_path / "full", *common))
    real_loader = finetune_engine.make_loader

    def interrupted(*a, **k):
        for i, batch in enumerate(real_loader(*a, **k)):
            if i == 6:
                raise KeyboardInterrupt
            yield batch
    monkeypatch.setattr(finetune_engine, "make_loader", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(args_for(tmp_path / "cut", *common))
    monkeypatch.setattr(finetune_engine, "make_loader", real_loader)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 4
    resumed = finetune.main(args_for(tmp_path / "cut", *common))
    a = addp.load_checkpoint(full["classifier"], component="classifier").state_dict()
    b = addp.load_checkpoint(resumed["classifier"], component="classifier").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full["val_top1"] == resumed["val_top1"]


def test_official_layout_converts_and_finetunes_one_step():
    keys = json.loads((OFFICIAL / "addp_vit_base_patch16.json").read_text())["keys"]
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) * 0.02 for k, s in keys.items()
             if not k.startswith(("vqgan.", "token_predictor."))}  # the encoder never reads those
    # 64 px: the official 16x16 position grid is resampled to 4x4
    enc = encoder_state_from_addp(state, image_size=64)
    model = load_encoder_state(addp.create_model("vit_base_patch16_cls", image_size=64, num_classes=10), enc,
                               "addp-vit-base-16.pth")
    assert model.pos_embed.shape == (1, 17, 768)
    assert torch.equal(model.blocks[11].attn.qkv.weight, state["blocks.11.attn.qkv.weight"])
    stage = finetuning.ClassifierStage(model, 10, mixup=0.8, cutmix=1.0)
    optimizer = stage.make_optimizer(stage.param_groups(0.05), lr=1e-3)
    before = model.head.weight.clone()
    inputs = stage.prepare(torch.rand(4, 3, 64, 64), torch.Generator().manual_seed(0), labels=torch.arange(4))
    stage.loss_module(**inputs).backward()
    optimizer.step()
    assert not torch.equal(before, model.head.weight)


def run_cli(capsys, *argv):
    code = finetune.cli(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    tok_only = addp.save_checkpoint(tmp_path / "tok.safetensors", addp.create_model("vqgan_small"))
    code, err = run_cli(capsys, "--finetune", str(tok_only), "--output-dir", str(tmp_path / "a"))
    assert code == 2 and "holds no encoder" in err and "\n" not in err

    five = addp.save_checkpoint(tmp_path / "five.safetensors", addp.create_model("vit_small_cls", num_classes=5))
    code, err = run_cli(capsys, "--finetune", str(five), "--eval-only", "--output-dir", str(tmp_path / "b"))
    assert code == 2 and "5-class head but the data has 10 classes" in err and "\n" not in err

    ckpt = small_addp_file(tmp_path)
    code, err = run_cli(capsys, "--finetune", str(ckpt), "--input-size", "30", "--output-dir", str(tmp_path / "c"))
    assert code == 2 and "not a multiple of" in err and "\n" not in err


def test_short_finetune_on_digits_beats_chance(tmp_path):
    torch.manual_seed(0)
    report = finetune.main(args_for(tmp_path, "--steps", "120", "--batch-size", "32", "--blr", "2e-2",
                                    "--warmup-steps", "10"))
    assert report["val_top1"] > 25  # chance: 10% (about 34% after these 120 steps from random init)
    assert (tmp_path / "classifier.safetensors").exists() and (tmp_path / "report.json").exists()
    again = finetune.main(args_for(tmp_path / "eval", "--finetune", report["classifier"], "--eval-only"))
    assert again["val_top1"] == pytest.approx(report["val_top1"])


def test_linear_probe_trains_only_the_head(tmp_path):
    ckpt = small_addp_file(tmp_path)
    report = finetune.main(args_for(tmp_path / "lp", "--finetune", str(ckpt), "--linear-probe", "--steps", "30"))
    cls = addp.load_checkpoint(report["classifier"], component="classifier")
    net = addp.load_checkpoint(ckpt)
    assert cls.config.head_norm and cls.config.global_pool == "token"
    assert torch.equal(cls.blocks[2].mlp.fc1.weight, net.blocks[2].mlp.fc1.weight)
    assert torch.equal(cls.norm_pre.weight, net.tokenizer_norm.weight)
    assert report["val_top1"] > 10
