"""Recipes of the official runs, epoch schedules, the ImageNet-root case and the switches of
the official training behaviour (predictor dropout, encoder & decoder token input)."""
import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import addp
from addp.training import finetune_data, finetune_engine, finetuning
from addp import finetune, train
from addp.training import run_stages
from addp.training import recipes
from addp.training.diffusion import DiffusionConfig, DiffusionProcess
from addp.runtime.distributed import DistInfo

pytestmark = pytest.mark.usefixtures("one_thread")

# Read off ChangyaoTian/ADDP@7c2c034: configs/release/{base,large}/pretrain_addp_*.sh and the
# main_pretrain.py defaults they keep (beta2 0.95, min_lr 0, crop scale 0.2, flip).
PRETRAIN = {
    "addp_vit_base_1600ep": dict(model="addp_vit_base_patch16", predictor_model="mage_vit_base_patch16",
                                 epochs=1600, warmup_epochs=40),
    "addp_vit_large_800ep": dict(model="addp_vit_large_patch16", predictor_model="mage_vit_large_patch16",
                                 epochs=800, warmup_epochs=40),
}
PRETRAIN_COMMON = dict(global_batch=4096, blr=1e-4, weight_decay=0.05, clip_grad=3.0, min_lr=0.0, beta1=0.9,
                       beta2=0.95, crop_min=0.2, no_flip=False)
# configs/release/{base,large}/finetune_addp_*.sh and main_finetune.py's defaults (min_lr 1e-6,
# beta2 0.999, smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1, avg pooling, no clipping).
FINETUNE = {
    "finetune_vit_base_100ep": dict(epochs=100, blr=1e-3, layer_decay=0.65, drop_path=0.1, warmup_epochs=20),
    "finetune_vit_large_50ep": dict(epochs=50, blr=2.5e-4, layer_decay=0.8, drop_path=0.2, warmup_epochs=5),
}
FINETUNE_COMMON = dict(global_batch=1024, input_size=256, weight_decay=0.05, reprob=0.25, mixup=0.8, cutmix=1.0,
                       smoothing=0.1, aa="rand-m9-mstd0.5-inc1", min_lr=1e-6, beta2=0.999, clip_grad=None,
                       global_pool="avg", eval_every_epochs=1.0)


@pytest.mark.parametrize("name", sorted(PRETRAIN))
def test_pretraining_recipe_is_the_official_script(name, capsys):
    args = train.parse_args(["--recipe", name])
    train.resolve_recipe(args, DistInfo(world_size=32))  # 32 GPUs: 128 images each, as the script splits
    for key, value in {**PRETRAIN[name], **PRETRAIN_COMMON}.items():
        assert getattr(args, key) == value, key
    assert (args.batch_size, args.accum_steps) == (128, 1)
    out = capsys.readouterr().err  # log lines go to stderr
    assert out.count("[recipe] ") == 1 and "pretrain_addp" in out
    # ImageNet: 1,281,167 images; a drop-last epoch of 4096 is 312 steps
    sched = run_stages.schedule(args, 1_281_167, 32)
    assert sched["steps"] == PRETRAIN[name]["epochs"] * 312 and sched["warmup_steps"] == 40 * 312
    cfg = run_stages.train_config(args, "addp", sched)
    assert cfg.betas == (0.9, 0.95) and cfg.base_lr(32) == pytest.approx(1e-4 * 4096 / 256)


@pytest.mark.parametrize("name", sorted(FINETUNE))
def test_finetune_recipe_is_the_official_script(name):
    args = finetune.parse_args(["--recipe", name])
    finetune_engine.resolve_recipe(args, "finetune")
    recipes.split_global_batch(args, 8, args.explicit)
    for key, value in {**FINETUNE[name], **FINETUNE_COMMON}.items():
        assert getattr(args, key) == value, key
    assert args.official_layout and args.batch_size == 128



@pytest.fixture(autouse=True)
def package_log_on_stderr():
    """The package's log lines on stderr, as every command sets them up (these tests call the
    commands' functions directly)."""
    from addp.cli import log_to_stderr
    log_to_stderr()

def test_linear_probe_recipe_is_crop_and_flip_only():
    args = finetune.parse_args(["--recipe", "linear_probe_vit"])
    finetune_engine.resolve_recipe(args, "finetune")
    assert args.linear_probe and args.probe_optimizer == "lars"
    assert (args.aa, args.reprob, args.mixup, args.cutmix) == ("", 0.0, 0.0, 0.0)
    transform = finetune_data.SeededTimmTransform(32, args.aa, args.reprob, probe=True).transform
    kinds = [type(t).__name__ for t in transform.transforms]
    assert kinds[:2] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"]
    assert not any("Augment" in k or "Jitter" in k or "Erasing" in k for k in kinds)


def test_resnet50_recipe_uses_beta2_098():
    args = train.parse_args(["--recipe", "addp_resnet50"])
    train.resolve_recipe(args, DistInfo(world_size=64))
    assert args.model == "addp_resnet50" and (args.beta1, args.beta2) == (0.9, 0.98)


def test_explicit_flags_win_over_the_recipe():
    args = train.parse_args(["--recipe", "addp_vit_base_1600ep", "--blr", "2e-4", "--batch-size", "64",
                             "--no-flip", "--beta2", "0.99"])
    train.resolve_recipe(args, DistInfo(world_size=8))
    assert (args.blr, args.no_flip, args.beta2) == (2e-4, True, 0.99)
    assert (args.batch_size, args.accum_steps) == (64, 8)  # 4096 = 64 x 8 accumulation x 8 processes
    assert args.epochs == 1600
    steps = train.parse_args(["--recipe", "addp_vit_base_1600ep", "--steps", "100", "--warmup-s", "10"])
    train.resolve_recipe(steps, DistInfo(world_size=8))
    assert (steps.epochs, steps.warmup_epochs, steps.steps, steps.warmup_steps) == (None, None, 100, 10)
    with pytest.raises(addp.AddpError, match="not a multiple"):
        train.resolve_recipe(train.parse_args(["--recipe", "addp_vit_base_1600ep", "--batch-size", "48"]),
                             DistInfo(world_size=8))


def test_plain_vit_defaults_are_the_official_ones_and_the_demo_keeps_its_own():
    def resolved(model, *extra):
        args = finetune.parse_args(["--data-path", "/imagenet", *extra])
        finetuning.resolve_defaults(args, addp.models.registry.preset_config(model))
        return args
    base, large = resolved("vit_base_patch16_cls"), resolved("vit_large_patch16_cls")
    assert (base.layer_decay, base.blr, base.drop_path, base.warmup_epochs) == (0.65, 1e-3, 0.1, 20)
    assert (large.layer_decay, large.blr, large.drop_path, large.warmup_epochs) == (0.8, 2.5e-4, 0.2, 5)
    probe = resolved("vit_base_patch16_cls", "--linear-probe")
    assert (probe.aa, probe.reprob, probe.blr) == ("", 0.0, 0.1)
    demo = finetune.parse_args([])
    finetuning.resolve_defaults(demo, addp.models.registry.preset_config("vit_small_cls"))
    assert (demo.layer_decay, demo.blr, demo.drop_path, demo.warmup_epochs) == (0.75, 1e-2, 0.1, None)
    pre = train.parse_args(["--model", "addp_vit_base_patch16", "--steps", "20000"])
    sched = run_stages.schedule(pre, 10_000, 1)  # 312 micro-batches of 32 per epoch
    assert sched["warmup_steps"] == 40 * 312 and run_stages.train_config(pre, "addp", sched).blr == 1e-4
    demo = train.parse_args([])
    sched = run_stages.schedule(demo, 1438, 1)
    assert (sched["steps"], sched["warmup_steps"]) == (6000, 100)
    assert run_stages.train_config(demo, "addp", sched).blr == 4e-3


# -- epochs, periodic evaluation, resume ---------------------------------------------------------
def small_addp_file(tmp_path) -> Path:
    torch.manual_seed(0)
    return addp.save_checkpoint(tmp_path / "addp.safetensors", {"addp": addp.create_model("addp_vit_small"),
                                                                 "tokenizer": addp.create_model("vqgan_small")})


def finetune_args(out, *extra):
    return finetune.parse_args(["--output-dir", str(out), "--batch-size", "16", "--labels-per-class", "10",
                                "--log-every", "2", "--blr", "2e-2", *extra])


def test_epochs_periodic_evaluation_and_resume_across_an_epoch_boundary(tmp_path, monkeypatch, capsys):
    # 100 labelled images / 16 = 6 steps per epoch: 3 epochs = 18 steps, evaluation at 6, 12, 18
    common = ["--epochs", "3", "--warmup-epochs", "0.5", "--eval-every-epochs", "1", "--ckpt-every", "4"]
    full = finetune.main(finetune_args(tmp_path / "full", *common))
    assert full["steps"] == 18
    run = json.loads((tmp_path / "full" / "run.json").read_text())
    assert run["schedule"] == {"global_batch": 16, "dataset_images": 100, "epochs": 3.0, "steps": 18,
                               "warmup_epochs": 0.5, "warmup_steps": 3, "eval_every_epochs": 1.0, "eval_every": 6}
    assert "3 epochs = 18 steps" in capsys.readouterr().err
    evals = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    evals = [e for e in evals if "val_top1" in e]
    assert [e["step"] for e in evals] == [6, 12, 18]
    best = json.loads((tmp_path / "full" / "best.json").read_text())
    assert best["top1"] == max(e["val_top1"] for e in evals)
    assert best["step"] == min(e["step"] for e in evals if e["val_top1"] == best["top1"])
    last = addp.load_checkpoint(tmp_path / "full" / "checkpoint-last.safetensors")
    final = addp.load_checkpoint(full["classifier"])
    assert all(torch.equal(a, b) for a, b in zip(last.state_dict().values(), final.state_dict().values()))
    assert (tmp_path / "full" / "checkpoint-best.safetensors").exists()

    real_loader = finetune_engine.make_loader

    def interrupted(*a, **k):
        for i, batch in enumerate(real_loader(*a, **k)):
            if i == 10:  # during step 11: the last checkpoint is step 8, one evaluation done
                raise KeyboardInterrupt
            yield batch
    monkeypatch.setattr(finetune_engine, "make_loader", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(finetune_args(tmp_path / "cut", *common))
    monkeypatch.setattr(finetune_engine, "make_loader", real_loader)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 8
    assert json.loads((tmp_path / "cut" / "best.json").read_text())["step"] == 6
    resumed = finetune.main(finetune_args(tmp_path / "cut", *common))  # crosses the epoch boundary at 12
    a = addp.load_checkpoint(full["classifier"]).state_dict()
    b = addp.load_checkpoint(resumed["classifier"]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "cut" / "best.json").read_text()) == best

    # the best so far survives a resume: a best no later evaluation beats stays, file untouched
    marked = {**best, "top1": 101.0}
    (tmp_path / "cut" / "best.json").write_text(json.dumps(marked))
    best_file = tmp_path / "cut" / "checkpoint-best.safetensors"
    stamp = best_file.stat().st_mtime_ns
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    state["step"] = 11  # go back before the evaluations at 12 and 18
    torch.save(state, tmp_path / "cut" / "checkpoint.pt")
    again = finetune.main(finetune_args(tmp_path / "cut", *common))
    assert again["best_top1"] == 101.0 and best_file.stat().st_mtime_ns == stamp


def test_official_layout_finetune_loads(tmp_path):
    ckpt = small_addp_file(tmp_path)
    net = addp.load_checkpoint(ckpt)
    args = finetune_args(tmp_path / "ft", "--finetune", str(ckpt), "--official-layout", "--steps", "2")
    finetuning.resolve_defaults(args, finetuning.build_classifier_for(args))
    model = finetuning.build_classifier_for(args, num_classes=10)
    state = model.state_dict()
    assert "norm_pre.weight" not in state and not model.config.pre_norm
    assert torch.equal(state["patch_embed.proj.bias"], net.patch_embed.proj.bias)
    assert torch.equal(state["pos_embed"], net.pos_embed)
    assert torch.equal(state["blocks.3.attn.qkv.weight"], net.blocks[3].attn.qkv.weight)
    assert torch.equal(state["fc_norm.weight"], torch.ones(64)) and torch.equal(state["fc_norm.bias"], torch.zeros(64))
    report = finetune.main(args)
    assert report["steps"] == 2 and json.loads((tmp_path / "ft" / "run.json").read_text())["official_layout"]
    # at paper scale the classifier has exactly the official fine-tune's keys
    official = json.loads((Path(__file__).parents[1] / "data" / "official_keys" /
                           "vit_finetune_base_patch16.json").read_text())["keys"]
    config = addp.models.classifier.classifier_config_for(addp.models.registry.preset_config("addp_vit_base_patch16"),
                                                   pre_norm=False, num_classes=1000)
    with torch.device("meta"):
        ours = addp.models.classifier.build_classifier(config)
    assert {k: list(v.shape) for k, v in ours.state_dict().items()} == official


# -- the ImageNet-root case ----------------------------------------------------------------------
def image_tree(root: Path, split: str, n: int) -> None:
    for cls in ("a", "b"):
        (root / split / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(root / split / cls / f"{i}.png")


def test_a_root_holding_train_and_val_pretrains_on_train_only(tmp_path, capsys):
    image_tree(tmp_path, "train", 3)
    image_tree(tmp_path, "val", 2)
    args = train.parse_args(["--data-path", str(tmp_path)])
    data = run_stages.build_dataset(args, 32)
    assert len(data) == 6 and all("/train/" in path for path, _ in data.samples)
    assert data.classes == ["a", "b"]
    out = capsys.readouterr().err.strip().splitlines()
    assert out == [f"[data] {tmp_path} holds train/: training reads {tmp_path / 'train'} only"]
    flat = run_stages.build_dataset(train.parse_args(["--data-path", str(tmp_path / "val")]), 32)
    assert len(flat) == 4 and capsys.readouterr().err == ""


# -- switches -----------------------------------------------------------------------------------
def frozen_pair():
    torch.manual_seed(0)
    return addp.create_model("vqgan_small").eval(), addp.create_model("mage_vit_small").eval()


def test_predictor_dropout_changes_the_targets_only_when_on():
    tok, pred = frozen_pair()
    images = torch.rand(4, 3, 32, 32)

    def sample(process, global_seed):
        torch.manual_seed(global_seed)  # dropout draws from the global RNG
        return process(images, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))

    off = DiffusionProcess(tok, copy.deepcopy(pred), DiffusionConfig())
    on = DiffusionProcess(tok, copy.deepcopy(pred), DiffusionConfig(predictor_dropout=0.1)).train()
    a, b = sample(off, 0), sample(off, 1)
    assert torch.equal(a.target, b.target) and torch.equal(a.x_t, b.x_t)
    c, d = sample(on, 0), sample(on, 1)
    assert torch.equal(c.mask, a.mask) and torch.equal(c.ids, a.ids)
    assert not torch.allclose(c.target, d.target) and not torch.allclose(c.target, a.target)
    # reference: MAGE in train mode with dropout 0.1, both passes in one batch, same global seed
    ref = addp.create_model("mage_vit_small", dropout=0.1)
    ref.load_state_dict(pred.state_dict())
    ref.train()
    torch.manual_seed(0)
    with torch.no_grad():
        both = ref(torch.cat([a.ids, a.ids]), torch.cat([a.mask_next, a.mask]))
    target = both.chunk(2)[1].float().softmax(-1) * a.mask[..., None]
    assert torch.allclose(c.target, target, atol=1e-6)
    with torch.no_grad():
        eval_target = pred(a.ids, a.mask).float().softmax(-1) * a.mask[..., None]
    assert torch.allclose(a.target, eval_target, atol=1e-6)


def test_encoder_and_decoder_token_input():
    torch.manual_seed(0)
    net = addp.create_model("addp_vit_small", token_input="encoder_decoder").eval()
    assert net.pos_token_embed.shape == (1, 65, 64)
    images, ids = torch.rand(2, 3, 32, 32), torch.randint(0, 256, (2, 64))
    mask = torch.rand(2, 64).argsort(1).argsort(1) < 40
    other = ids.clone()
    other[~mask] = (other[~mask] + 1) % 256
    with torch.no_grad():
        tokens = net._reliable_token_input(ids, mask, 24, net.pos_token_embed)
        feats = net.forward_encoder(images, tokens)
        feats_other = net.forward_encoder(images, net._reliable_token_input(other, mask, 24, net.pos_token_embed))
        assert not torch.allclose(feats, feats_other)  # the encoder reads the reliable tokens
        # reference: the same blocks over [cls, patches, tokens] by hand
        x = net.patch_embed((images - net.pixel_mean) / net.pixel_std) + net.pos_embed[:, 1:]
        cls = (net.cls_token + net.pos_embed[:, :1]).expand(2, -1, -1)
        x = torch.cat([net.tokenizer_norm(torch.cat([cls, x], 1)), tokens], 1)
        for blk in net.blocks:
            x = blk(x)
        assert torch.allclose(feats, net.norm(x)[:, 1:65], atol=1e-5)
        logits = net(images, ids, mask, 24)
    assert logits.shape == (2, 64, net.config.vocab_size)
    plain = addp.create_model("addp_vit_small")
    assert not hasattr(plain, "pos_token_embed")
