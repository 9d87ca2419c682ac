"""Fine-tuning and linear probing of an ADDP encoder for classification: the classifier to
train, its optimisation stage for the Trainer (layer decay, Mixup/CutMix, LARS), its
evaluation and the defaults of `addp.finetune`. What the fine-tuning commands share is
`finetune_engine`."""
from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import Lars, param_groups_layer_decay
from torch.utils.data import DataLoader, Dataset

from . import recipes
from ..models import registry
from ..models.checkpoint import CheckpointError, load_components
from ..models.classifier import (CNNClassifier, ClassifierConfig, build_classifier, classifier_config_for,
                         encoder_state_from_addp, load_encoder_state, resample_pos_embed)
from ..errors import AddpError
from ..models.registry import vit_size
from ..runtime.distributed import DistInfo
from .stages import Objective
from .config import Stage
from .finetune_data import _collate

PROBE_OPTIMIZERS = ("lars", "sgd")


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
        model = build_classifier(replace(config, num_classes=num_classes))
        _init_head(model, probe)
        return model
    models = load_components(args.finetune)
    if "classifier" in models:
        saved = models["classifier"]
        config = replace(saved.config, **overrides)
        if num_classes is None:
            return config
        if saved.config.num_classes != num_classes:
            raise AddpError(f"{args.finetune} has a {saved.config.num_classes}-class head but the data has "
                            f"{num_classes} classes")
        return _classifier_from_saved(saved, config, args.finetune)
    if "addp" not in models:
        raise CheckpointError(f"{args.finetune} holds no encoder (it holds: {', '.join(models)}); pass an "
                              "ADDP pretraining checkpoint (ours or addp-vit-*-16.pth) or a classifier")
    if args.eval_only and not args.resume:
        raise AddpError(f"--eval-only evaluates a trained classifier, but {args.finetune} holds a pretraining "
                        "checkpoint (its head would be random); give a classifier checkpoint or --resume")
    addp = models["addp"]
    config = classifier_config_for(addp.config, **overrides)
    if num_classes is None:
        return config
    config = replace(config, num_classes=num_classes)
    state = encoder_state_from_addp(addp, config.image_size, config.global_pool, config.pre_norm)
    model = build_classifier(config)
    if args.official_layout and config.arch == "vit" and config.global_pool == "avg":
        # the official fine-tune drops the pretrained `norm` and starts fc_norm fresh
        state.update({f"fc_norm.{k}": v.detach().clone() for k, v in model.fc_norm.state_dict().items()})
    model = load_encoder_state(model, state, args.finetune)
    _init_head(model, probe)
    return model




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

def _classification_loss(model: nn.Module, criterion: nn.Module, images: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    return criterion(model(images), targets)


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
        self.loss_module = Objective(model, functools.partial(_classification_loss, criterion=criterion))

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
def evaluate(model: nn.Module, dataset: Dataset, dist: DistInfo, batch_size: int = 256, num_workers: int = 0) -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross entropy; shards across the processes of `dist`."""
    device, world = dist.device, dist.world_size
    shard = torch.utils.data.Subset(dataset, list(range(dist.rank, len(dataset), world)))
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
        torch.distributed.all_reduce(totals)
    top1, top5, loss, n = totals.tolist()
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "loss": loss / n, "num_images": int(n)}



# -- main ------------------------------------------------------------------------------------
def encoder_size(config: ClassifierConfig) -> str | None:
    """"base" / "large" for the paper's ViT widths, else None (small and CNN encoders)."""
    return vit_size(config.embed_dim) if config.arch == "vit" else None


def resolve_defaults(args, config: ClassifierConfig) -> None:
    """Options left unset: the official values for ViT-B/L encoders, the digits demo's otherwise."""
    official = recipes.official_finetune(encoder_size(config))
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
    if args.weight_decay is None:
        args.weight_decay = 0.0 if probe else 0.05
    if args.warmup_steps is None and args.warmup_epochs is None and official and not probe:
        args.warmup_epochs = official["warmup_epochs"]
