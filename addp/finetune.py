"""`python -m addp.finetune`: fine-tune or linearly probe an ADDP encoder for classification.

The recipe of MAE/BEiT from timm's parts: layer-wise lr decay, AdamW, cosine schedule with
warm-up, RandAugment + random erasing, Mixup/CutMix with soft-target cross entropy, label
smoothing, drop path, optional EMA. `--linear-probe` freezes the encoder and trains
BatchNorm(affine=False) + a linear head with LARS (or SGD), as MAE does. Training runs on
`trainer.Trainer` (DDP under torchrun, atomic checkpoints, exact resume, logs).

With no `--data-path` it runs on the bundled digits (train split -> held-out split, 32 px,
random shifts only: a mirrored digit is another glyph). With `--data-path root` it reads
`root/train` and `root/val` ImageFolder trees (ImageNet as is).
Writes `classifier.safetensors` (our format) and `report.json` to `--output-dir`.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import Lars, param_groups_layer_decay
from torch.utils.data import DataLoader, Dataset

from .training import recipes
from .models import registry
from .models.checkpoint import CheckpointError, load_components, save_checkpoint
from .models.classifier import (GLOBAL_POOLS, CNNClassifier, ClassifierConfig, build_classifier,
                         classifier_config_for, encoder_state_from_addp, load_encoder_state,
                         resample_pos_embed)
from .training.data import DigitsDataset, ImageFolderDataset, _sample_seed, default_workers, make_loader
from .runtime.distributed import init_distributed
from .models.addp import IMAGENET_MEAN, IMAGENET_STD
from .cli import (RESUMABLE, ArgumentParser, device, existing_file, existing_path, fraction, integer,
                  non_negative_float, non_negative_int, number, output_folder, positive_float, positive_int,
                  probability, random_seed, run_command)
from .errors import AddpError
from .runs.files import atomic_write, remove_stale_temp_files, write_json
from .runtime.precision import PRECISIONS
from .runs.records import sha256_file
from .training.trainer import Stage, TrainConfig, Trainer, identity_of

PROBE_OPTIMIZERS = ("lars", "sgd")
log = logging.getLogger("addp.finetune")  # a fixed name: run as `python -m`, __name__ is "__main__"


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser("finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=None, choices=recipes.names("finetune"),
                   help="the settings of an official fine-tune or of the paper's linear probe (explicit flags win)")
    p.add_argument("--finetune", type=existing_path,
                   help="checkpoint to start from: ours (ADDP or classifier) or addp-vit-*-16.pth")
    p.add_argument("--official-layout", action="store_true",
                   help="load the encoder as the official fine-tune does: no tokenizer_norm, fc_norm fresh")
    p.add_argument("--model", default=None, choices=registry.list_models("classifier"),
                   help="classifier preset when no --finetune is given (random init); default vit_small_cls")
    p.add_argument("--linear-probe", action="store_true", help="frozen encoder, BatchNorm + linear head")
    p.add_argument("--eval-only", action="store_true", help="evaluate --finetune (or --resume) and stop")
    p.add_argument("--data-path", help="folder with train/ and val/ ImageFolder trees; default: bundled digits")
    p.add_argument("--labels-per-class", type=positive_int, default=None, help="train on N labelled images per class")
    p.add_argument("--input-size", type=positive_int, default=None, help="default: the encoder's pretraining size")
    p.add_argument("--global-pool", default=None, choices=GLOBAL_POOLS, help="default: avg (token for a probe)")
    p.add_argument("--output-dir", type=output_folder, default="output/finetune")
    p.add_argument("--steps", type=positive_int, default=600)
    p.add_argument("--epochs", type=positive_float, default=None, help="training length in epochs (replaces --steps)")
    p.add_argument("--warmup-steps", type=non_negative_int, default=None,
                   help="default: 20 epochs for ViT-B, 5 for ViT-L (the official runs), else 5%% of the steps")
    p.add_argument("--warmup-epochs", type=non_negative_float, default=None,
                   help="warm-up in epochs (replaces --warmup-steps)")
    p.add_argument("--eval-every", type=non_negative_int, default=0,
                   help="evaluate on the validation set every N steps, keeping checkpoint-best/-last (0: at the end only)")
    p.add_argument("--eval-every-epochs", type=positive_float, default=None,
                   help="the same in epochs (replaces --eval-every)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="per process and micro-step")
    p.add_argument("--accum-steps", type=positive_int, default=1)
    p.add_argument("--global-batch", type=positive_int, default=None,
                   help="images per optimizer step over all processes; sets --batch-size (or, when "
                        "--batch-size is given, --accum-steps) from the world size")
    p.add_argument("--blr", type=positive_float, default=None,
                   help="lr = blr * global batch / 256; default 1e-3 for ViT-B, 2.5e-4 for ViT-L (official), "
                        "else 5e-4; probe 0.1 (MAE); on digits 1e-2, probe 25 "
                        "(LARS needs MAE's absolute lr, ~6.4, at small batches)")
    p.add_argument("--lr", type=positive_float, default=None, help="absolute lr (overrides --blr)")
    p.add_argument("--min-lr", type=non_negative_float, default=1e-6)
    p.add_argument("--layer-decay", type=number(0, 1, low_open=True), default=None,
                   help="layer-wise lr decay (1: off); default 0.65 for ViT-B, 0.8 for ViT-L (official), else 0.75")
    p.add_argument("--weight-decay", type=non_negative_float, default=None, help="default 0.05 (probe 0)")
    p.add_argument("--drop-path", type=fraction, default=None, help="default 0.2 for ViT-L, else 0.1")
    p.add_argument("--smoothing", type=fraction, default=0.1)
    p.add_argument("--mixup", type=non_negative_float, default=None,
                   help="mixup alpha (default 0.8; 0 on digits and probes)")
    p.add_argument("--cutmix", type=non_negative_float, default=None,
                   help="cutmix alpha (default 1.0; 0 on digits and probes)")
    p.add_argument("--aa", default=None,
                   help="timm auto-augment policy (ImageFolder data); default rand-m9-mstd0.5-inc1, none for a "
                        "probe (crop and flip only, paper Tab. 16)")
    p.add_argument("--reprob", type=probability, default=None,
                   help="random erasing probability (ImageFolder data); default 0.25, 0 for a probe")
    p.add_argument("--shift", type=non_negative_int, default=2, help="digits: random shift of up to this many pixels")
    p.add_argument("--probe-optimizer", default="lars", choices=PROBE_OPTIMIZERS)
    p.add_argument("--clip-grad", type=non_negative_float, default=None)
    p.add_argument("--beta1", type=fraction, default=0.9, help="AdamW beta1 (fine-tuning)")
    p.add_argument("--beta2", type=fraction, default=0.999, help="AdamW beta2 (fine-tuning)")
    p.add_argument("--ema-decay", type=fraction, default=0.0, help="EMA of the weights (0: off)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--log-every", type=positive_int, default=50)
    p.add_argument("--ckpt-every", type=positive_int, default=500)
    p.add_argument("--seed", type=random_seed, default=0)
    p.add_argument("--num-workers", type=integer(0, 256), default=None,
                   help="default: 0 for digits, min(8, CPU cores) for folders")
    p.add_argument("--device", type=device, default=None)
    p.add_argument("--resume", type=existing_file, default=None, help="a checkpoint.pt of this run to continue from")
    p.add_argument("--force", action="store_true", help="start over in an output folder of another run")
    return p


# -- data ------------------------------------------------------------------------------------
class ShiftedDigits(Dataset):
    """Digits with a random shift of up to `shift` pixels (zero padding), drawn per (epoch, index)."""

    def __init__(self, base: DigitsDataset, shift: int, seed: int):
        self.base, self.shift, self.seed = base, shift, seed
        self.labels = base.labels

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image, label, bad = self.base[key]
        if self.shift:
            g = torch.Generator().manual_seed(_sample_seed(self.seed + 17, epoch, index))
            dy, dx = torch.randint(0, 2 * self.shift + 1, (2,), generator=g).tolist()
            s, (h, w) = self.shift, image.shape[-2:]
            image = F.pad(image, (s, s, s, s))[:, dy:dy + h, dx:dx + w]
        return image, label, bad


class SeededTimmTransform:
    """timm's training transform (RandAugment, random erasing, ...) returning images in [0, 1].

    timm draws from Python's `random`; it is seeded from torch's RNG, which ImageFolderDataset
    seeds per (epoch, index), so augmentations repeat exactly on resume."""

    def __init__(self, image_size: int, aa: str | None, reprob: float, probe: bool = False):
        # a probe: RandomResizedCrop + flip only (no colour jitter either), paper Tab. 16
        self.transform = create_transform(image_size, is_training=True, auto_augment=aa or None, re_prob=reprob,
                                          re_mode="pixel", re_count=1, interpolation="bicubic",
                                          color_jitter=None if probe else 0.4,
                                          mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, img):
        state = random.getstate()
        random.seed(int(torch.randint(2 ** 62, ())))
        try:
            x = self.transform(img)
        finally:
            random.setstate(state)
        return x * self.std + self.mean  # the classifier normalises its input itself


class Subset(Dataset):
    """The items `indices` of a dataset addressed by (index, epoch) keys."""

    def __init__(self, base: Dataset, indices: list[int]):
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        return self.base[(self.indices[index], epoch)]


def labels_of(dataset) -> list[int]:
    if hasattr(dataset, "labels"):
        return [int(x) for x in dataset.labels]
    return [label for _, label in dataset.samples]


def per_class_subset(labels: list[int], n: int, seed: int) -> list[int]:
    """The first `n` images of each class in a permutation drawn from `seed` (sorted)."""
    if n < 1:
        raise AddpError(f"--labels-per-class must be at least 1, got {n}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed + 99)).tolist()
    taken: dict[int, int] = {}
    pick = []
    for i in order:
        if taken.get(labels[i], 0) < n:
            taken[labels[i]] = taken.get(labels[i], 0) + 1
            pick.append(i)
    return sorted(pick)


def build_datasets(args, image_size: int):
    """(train, val, num_classes)."""
    if args.data_path:
        root = Path(args.data_path)
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise AddpError(f"{root} has no {split}/ folder (expected {root}/train/<class>/*.jpg "
                                f"and {root}/val/<class>/*.jpg)")
        train = ImageFolderDataset(root / "train", image_size, seed=args.seed)
        train.transform = SeededTimmTransform(image_size, args.aa, args.reprob, args.linear_probe)
        val = ImageFolderDataset(root / "val", image_size, train=False)
        if train.classes != val.classes:
            raise AddpError(f"train/ has {len(train.classes)} classes and val/ has {len(val.classes)}: they must match")
        num_classes = len(train.classes)
    else:
        train = ShiftedDigits(DigitsDataset("train", image_size), args.shift, args.seed)
        val = DigitsDataset("heldout", image_size)
        num_classes = 10
    if args.labels_per_class:
        train = Subset(train, per_class_subset(labels_of(train), args.labels_per_class, args.seed))
    return train, val, num_classes


# -- model -----------------------------------------------------------------------------------
def head_of(model: nn.Module) -> nn.Module:
    return model.body.get_classifier() if isinstance(model, CNNClassifier) else model.get_classifier()


def build_classifier_for(args, num_classes: int | None = None, image_size: int | None = None):
    """The classifier to train: from --finetune (encoder, or a whole classifier) or a preset.

    With `num_classes=None` only the config is worked out (to size the data first)."""
    probe = args.linear_probe
    overrides = dict(head_norm=probe)
    if probe or args.drop_path is not None:  # None: the size's default, set once the encoder is known
        overrides["drop_path"] = 0.0 if probe else args.drop_path
    if args.official_layout:
        overrides["pre_norm"] = False
    if args.global_pool or probe:
        overrides["global_pool"] = args.global_pool or "token"
    if image_size:
        overrides["image_size"] = image_size
    if not args.finetune:
        config = registry.preset_config(args.model or "vit_small_cls", **overrides)
        if num_classes is None:
            return config
        model = build_classifier(_with(config, num_classes=num_classes))
        _init_head(model, probe)
        return model
    models = load_components(args.finetune)
    if "classifier" in models:
        saved = models["classifier"]
        config = _with(saved.config, **overrides)
        if num_classes is None:
            return config
        if saved.config.num_classes != num_classes:
            raise AddpError(f"{args.finetune} has a {saved.config.num_classes}-class head but the data has "
                            f"{num_classes} classes")
        return _classifier_from_saved(saved, config, args.finetune)
    if "addp" not in models:
        raise CheckpointError(f"{args.finetune} holds no encoder (it holds: {', '.join(models)}); pass an "
                              "ADDP pretraining checkpoint (ours or addp-vit-*-16.pth) or a classifier")
    addp = models["addp"]
    config = classifier_config_for(addp.config, **overrides)
    if num_classes is None:
        return config
    config = _with(config, num_classes=num_classes)
    state = encoder_state_from_addp(addp, config.image_size, config.global_pool, config.pre_norm)
    model = build_classifier(config)
    if args.official_layout and config.arch == "vit" and config.global_pool == "avg":
        # the official fine-tune drops the pretrained `norm` and starts fc_norm fresh
        state.update({f"fc_norm.{k}": v.detach().clone() for k, v in model.fc_norm.state_dict().items()})
    model = load_encoder_state(model, state, args.finetune)
    _init_head(model, probe)
    return model


def _with(config: ClassifierConfig, **overrides) -> ClassifierConfig:
    return ClassifierConfig(**{**config.__dict__, **overrides})


def _classifier_from_saved(saved: nn.Module, config: ClassifierConfig, source: str) -> nn.Module:
    state = saved.state_dict()
    if config.arch == "vit" and config.image_size != saved.config.image_size:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], config.patch_size, config.image_size)
    model = build_classifier(config)
    result = model.load_state_dict(state, strict=False)
    bad = result.unexpected_keys + result.missing_keys
    if bad:
        raise CheckpointError(f"{source}: the saved classifier does not fit the options asked for "
                              f"(e.g. --global-pool or --linear-probe differ: {', '.join(bad[:3])})")
    return model


def _init_head(model: nn.Module, probe: bool) -> None:
    """MAE's head init: std 2e-5 for fine-tuning, 0.01 for a probe; zero bias."""
    head = head_of(model)
    linear = head[-1] if isinstance(head, nn.Sequential) else head
    nn.init.trunc_normal_(linear.weight, std=0.01 if probe else 2e-5)
    nn.init.zeros_(linear.bias)


# -- the stage -------------------------------------------------------------------------------
class _Objective(nn.Module):
    def __init__(self, model: nn.Module, criterion: nn.Module):
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.model(images), targets)


class ClassifierStage(Stage):
    """Fine-tuning (layer-decay AdamW) or linear probing (LARS/SGD on the head) for the Trainer."""

    name = "finetune"

    def __init__(self, model: nn.Module, num_classes: int, probe: bool = False, layer_decay: float = 0.75,
                 mixup: float = 0.0, cutmix: float = 0.0, smoothing: float = 0.1, probe_optimizer: str = "lars"):
        self.model, self.probe, self.layer_decay, self.probe_optimizer = model, probe, layer_decay, probe_optimizer
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing,
                               num_classes=num_classes)
            criterion = SoftTargetCrossEntropy()
        elif smoothing > 0:
            criterion = LabelSmoothingCrossEntropy(smoothing)
        else:
            criterion = nn.CrossEntropyLoss()
        if probe:
            model.requires_grad_(False)
            head_of(model).requires_grad_(True)
        self.loss_module = _Objective(model, criterion)

    def prepare(self, images, generator, labels):
        if self.mixup is None:
            return {"images": images, "targets": labels}
        # timm's Mixup draws from numpy's global RNG: seed it from our generator (exact resume)
        state = np.random.get_state()
        np.random.seed(int(torch.randint(2 ** 31, (), generator=generator)))
        try:
            images, targets = self.mixup(images, labels)
        finally:
            np.random.set_state(state)
        return {"images": images, "targets": targets}

    def param_groups(self, weight_decay: float) -> list[dict]:
        if self.probe:  # LARS adapts matrices only (MAE); no decay on vectors
            params = [p for p in self.model.parameters() if p.requires_grad]
            return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "always_adapt": True},
                    {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "always_adapt": False}]
        net = self.model.body if isinstance(self.model, CNNClassifier) else self.model
        no_decay = net.no_weight_decay() if hasattr(net, "no_weight_decay") else ()
        return param_groups_layer_decay(net, weight_decay, no_weight_decay_list=no_decay,
                                        layer_decay=self.layer_decay)

    def make_optimizer(self, groups: list[dict], lr: float, betas: tuple = (0.9, 0.999)) -> torch.optim.Optimizer:
        if not self.probe:
            return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
        if self.probe_optimizer == "lars":
            return Lars(groups, lr=lr, momentum=0.9)
        for g in groups:
            g.pop("always_adapt", None)
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)


# -- evaluation ------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 256,
             num_workers: int = 0) -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross entropy; shards across DDP ranks."""
    import torch.distributed as dist
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    shard = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world)))
    # its own generator: evaluating mid-run must not consume the global RNG (exact resume)
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                        generator=torch.Generator().manual_seed(0))
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss sum, count
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        totals += torch.stack([(top[:, 0] == labels).sum(), (top == labels[:, None]).any(1).sum(),
                               F.cross_entropy(logits, labels, reduction="sum"),
                               torch.tensor(len(labels), device=device)]).double()
    if world > 1:
        dist.all_reduce(totals)
    top1, top5, loss, n = totals.tolist()
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "loss": loss / n, "num_images": int(n)}


def _collate(items):
    images, labels, _ = zip(*items)
    return torch.stack(images), torch.as_tensor(labels)


# -- main ------------------------------------------------------------------------------------
def encoder_size(config: ClassifierConfig) -> str | None:
    """"base" / "large" for the paper's ViT widths, else None (small and CNN encoders)."""
    if config.arch != "vit":
        return None
    return {768: "base", 1024: "large"}.get(config.embed_dim)


# official fine-tune settings per encoder size (finetune_addp_{base_100,large_50}ep.sh)
OFFICIAL_FINETUNE = {"base": {"layer_decay": 0.65, "blr": 1e-3, "warmup_epochs": 20.0},
                     "large": {"layer_decay": 0.8, "blr": 2.5e-4, "warmup_epochs": 5.0}}


def resolve_defaults(args, config: ClassifierConfig) -> None:
    """Options left unset: the official values for ViT-B/L encoders, the digits demo's otherwise."""
    official = OFFICIAL_FINETUNE.get(encoder_size(config), {})
    probe = args.linear_probe
    if args.layer_decay is None:
        args.layer_decay = official.get("layer_decay", 0.75)
    if args.drop_path is None:
        args.drop_path = 0.2 if encoder_size(config) == "large" else 0.1
    if args.aa is None:
        args.aa = "" if probe else "rand-m9-mstd0.5-inc1"
    if args.reprob is None:
        args.reprob = 0.0 if probe else 0.25
    if args.blr is None:
        if args.data_path:
            args.blr = 0.1 if probe else official.get("blr", 5e-4)
        else:
            args.blr = 25.0 if probe else 1e-2
    if args.warmup_steps is None and args.warmup_epochs is None and official and not probe:
        args.warmup_epochs = official["warmup_epochs"]


def schedule(args, num_train: int, world_size: int) -> dict:
    """Steps, warm-up steps and evaluation interval, from epochs where they are given in epochs."""
    convert = lambda epochs, at_least=1: recipes.epochs_to_steps(  # noqa: E731
        epochs, num_train, args.batch_size, world_size, args.accum_steps, at_least)
    out = {"global_batch": args.batch_size * args.accum_steps * world_size, "dataset_images": num_train}
    steps = args.steps
    if args.epochs is not None:
        steps, out["epochs"] = convert(args.epochs), args.epochs
    if args.warmup_epochs is not None:
        warmup, out["warmup_epochs"] = convert(args.warmup_epochs, 0), args.warmup_epochs
    else:
        warmup = args.warmup_steps if args.warmup_steps is not None else steps // 20
    every = args.eval_every
    if args.eval_every_epochs is not None:
        every, out["eval_every_epochs"] = convert(args.eval_every_epochs), args.eval_every_epochs
    if every < 0:
        raise AddpError(f"--eval-every must be at least 0, got {every}")
    out.update(steps=steps, warmup_steps=min(warmup, steps - 1), eval_every=every)
    return out


def train_config(args, sched: dict) -> TrainConfig:
    probe = args.linear_probe
    wd = args.weight_decay if args.weight_decay is not None else (0.0 if probe else 0.05)
    workers = args.num_workers if args.num_workers is not None else (default_workers() if args.data_path else 0)
    return TrainConfig(steps=sched["steps"], batch_size=args.batch_size, accum_steps=args.accum_steps,
                       blr=args.blr, lr=args.lr, min_lr=args.min_lr, warmup_steps=sched["warmup_steps"],
                       weight_decay=wd, betas=(args.beta1, args.beta2), clip_grad=args.clip_grad,
                       precision=args.precision, ema_decay=args.ema_decay, compile=args.compile,
                       log_every=args.log_every, ckpt_every=args.ckpt_every, seed=args.seed, num_workers=workers)


class PeriodicEvaluation:
    """Top-1/top-5/loss on the validation set every `every` steps (and at the last step):
    writes `checkpoint-last.safetensors` and, when top-1 improves, `checkpoint-best.safetensors`
    (both atomic); `best.json` carries the best so far across resumes."""

    def __init__(self, trainer: Trainer, val_set, every: int, out: Path, num_workers: int):
        self.trainer, self.val_set, self.every, self.out = trainer, val_set, every, out
        self.num_workers = num_workers
        self.best_file = out / "best.json"
        self.best = json.loads(self.best_file.read_text()) if self.best_file.exists() else None

    def __call__(self, step: int) -> dict | None:
        if not self.every or (step % self.every and step != self.trainer.cfg.steps):
            return None
        model = self.trainer.final_model()
        metrics = evaluate(model, self.val_set, self.trainer.dist.device, num_workers=self.num_workers)
        self.trainer.model.train()
        improved = self.best is None or metrics["top1"] > self.best["top1"]
        if improved:
            self.best = {"step": step, **metrics}
        if self.trainer.dist.is_main:
            save_checkpoint(self.out / "checkpoint-last.safetensors", _cpu_copy(model))
            if improved:
                save_checkpoint(self.out / "checkpoint-best.safetensors", _cpu_copy(model))
                text = json.dumps(self.best, indent=1)
                atomic_write(self.best_file, lambda tmp: Path(tmp).write_text(text))
            log.info(f"[finetune] step {step}: val top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
                     f"loss {metrics['loss']:.4f}  (best top-1 {self.best['top1']:.2f}% at step {self.best['step']})")
        return {f"val_{k}": v for k, v in metrics.items() if k != "num_images"}


def _cpu_copy(model: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(model).cpu()


def resolve_recipe(args, say) -> dict | None:
    """Fill in --recipe's settings (not the explicit flags); says so once. The record for run.json."""
    if not args.recipe:
        return None
    explicit = getattr(args, "explicit", set())
    filled = recipes.apply(args, args.recipe, "finetune", explicit)
    say(recipes.describe(args.recipe, filled, explicit))
    return {"name": args.recipe, "source": recipes.RECIPES[args.recipe].source, "filled": filled}


def main(args) -> dict:
    dist = init_distributed(args.device)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    say = log.info
    recipe = resolve_recipe(args, say)
    line = recipes.split_global_batch(args, dist.world_size, getattr(args, "explicit", set()))
    if line:
        say(line)
    out = Path(args.output_dir)
    if dist.is_main:
        remove_stale_temp_files(out)
    config = build_classifier_for(args, image_size=args.input_size)  # sizes the data
    resolve_defaults(args, config)
    train_set, val_set, num_classes = build_datasets(args, config.image_size)
    model = build_classifier_for(args, num_classes=num_classes, image_size=args.input_size)
    digits = not args.data_path
    mixup = args.mixup if args.mixup is not None else (0.0 if digits or args.linear_probe else 0.8)
    cutmix = args.cutmix if args.cutmix is not None else (0.0 if digits or args.linear_probe else 1.0)
    if (mixup > 0 or cutmix > 0) and args.batch_size % 2:
        raise AddpError(f"mixup/cutmix need an even --batch-size, got {args.batch_size}")
    stage = ClassifierStage(model, num_classes, args.linear_probe, args.layer_decay, mixup, cutmix,
                            args.smoothing, args.probe_optimizer)
    sched = schedule(args, len(train_set), dist.world_size)
    if {"epochs", "warmup_epochs", "eval_every_epochs"} & set(sched) and not args.eval_only:
        say(recipes.describe_schedule(sched))
    cfg = train_config(args, sched)
    run_info = {"schedule": sched, **({"recipe": recipe} if recipe else {})}
    identity = identity_of(cfg, model.config, run_info, {
        "finetune": str(args.finetune), "finetune_sha256": sha256_file(args.finetune) if args.finetune else None,
        "linear_probe": args.linear_probe, "layer_decay": args.layer_decay,
        "mixup": mixup, "cutmix": cutmix, "smoothing": args.smoothing, "probe_optimizer": args.probe_optimizer,
        "data": args.data_path or "digits", "labels_per_class": args.labels_per_class, "shift": args.shift,
        "aa": args.aa, "reprob": args.reprob, "official_layout": args.official_layout,
        "world_size": dist.world_size})
    trainer = Trainer(stage, cfg, out, dist, identity)
    report = {"output_dir": str(out), "model": model.config.name, "finetune": args.finetune,
              "mode": "linear_probe" if args.linear_probe else "finetune", "num_classes": num_classes,
              "train_images": len(train_set), "val_images": len(val_set)}
    if args.eval_only:
        if args.resume:
            trainer.load(Path(args.resume))
    else:
        trainer.maybe_resume(args.resume, args.force)
        if trainer.step:
            log.info(f"[finetune] resuming at step {trainer.step} from {trainer.checkpoint_path}")
        periodic = PeriodicEvaluation(trainer, val_set, sched["eval_every"], out, cfg.num_workers)
        trainer.fit(lambda start: make_loader(train_set, cfg.batch_size, cfg.seed, dist.rank, dist.world_size,
                                              start, cfg.num_workers), on_step=periodic)
        report["steps"] = cfg.steps
        if periodic.best:
            report.update({f"best_{k}": v for k, v in periodic.best.items()})
            report["checkpoint_best"] = str(out / "checkpoint-best.safetensors")
    final = trainer.final_model()
    report.update({f"val_{k}": v for k, v in evaluate(final, val_set, dist.device,
                                                      num_workers=cfg.num_workers).items()})
    report["chance_top1"] = 100.0 / num_classes
    if dist.is_main and not args.eval_only:
        report["classifier"] = str(save_checkpoint(out / "classifier.safetensors", final.cpu()))
    report["wall_time_s"] = round(time.perf_counter() - started, 1)
    if dist.is_main:
        write_json(out / "report.json", report)
        log.info(f"[finetune] val top-1 {report['val_top1']:.2f}%  top-5 {report['val_top5']:.2f}%  "
                 f"({report['val_num_images']} images, chance {report['chance_top1']:.1f}%)")
    return report


def parse_args(argv=None) -> argparse.Namespace:
    return recipes.record_explicit(get_args_parser(), argv).parse_args(argv)


def cli(argv=None) -> int:
    return run_command("finetune", recipes.record_explicit(get_args_parser(), argv), main, argv, interrupted=RESUMABLE)


if __name__ == "__main__":
    sys.exit(cli())
