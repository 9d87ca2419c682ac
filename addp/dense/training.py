"""What `addp.detect` and `addp.segment` share beyond the fine-tuning engine
(`addp.training.finetune_engine`): their model and data flags, the digits canvases, the model
to start from, the training stage (layer-wise lr decay AdamW), the batch collation and the
input size check."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

from ..cli import ArgumentParser, positive_float, positive_int
from ..errors import AddpError, CheckpointError
from ..models import registry
from ..models.checkpoint import load_components
from ..runs.files import atomic_write
from ..runtime.distributed import barrier
from ..training import finetune_engine as engine
from ..training.trainer import Trainer
from . import canvas
from .backbone import ABS_POS, backbone_config_for, load_encoder

log = logging.getLogger("addp.dense")


def add_dense_args(p: ArgumentParser, command: str, *, steps: int, blr: float, layer_decay: float) -> None:
    """The flags of detect and segment: the shared training flags (`finetune_engine.add_training_args`
    with the command's defaults `steps`, `blr`, `layer_decay`), then the encoder preset, the
    canvases, the input size and the backbone's options."""
    engine.add_training_args(
        p, command, steps=steps, blr=blr, layer_decay=layer_decay, finetune_type=None, precision="fp32", helps={
            "recipe": "the paper's appendix settings for ViT-B/L (explicit flags win)",
            "finetune": "encoder to start from: our ADDP checkpoint, addp-vit-*-16.pth, a folder or a Hub id; "
                        "or a checkpoint of this command's model (continue from it)",
            "data_path": "dataset root; default: the digits canvases (built once)"})
    p.add_argument("--model", default="addp_vit_small", choices=registry.list_models("addp"),
                   help="ADDP preset whose encoder is built at random init when no --finetune is given")
    p.add_argument("--canvas-dir", default="output/dense-canvas", help="where the digits canvases are built")
    p.add_argument("--input-size", type=positive_int, default=None, help="default 96 on the canvases")
    p.add_argument("--window-size", type=positive_int, default=None,
                   help="window of the window-attention blocks (default 14 for patch 16, else the pretraining grid)")
    p.add_argument("--no-rel-pos", dest="rel_pos", action="store_false", help="no relative position bias")
    p.add_argument("--abs-pos", default="interpolate", choices=ABS_POS,
                   help="the stored position grid on a larger input: stretched (interpolate) or repeated (tile)")
    p.add_argument("--jitter", type=positive_float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="training scale jitter range")


def data_root(args, dist, key: str) -> Path:
    """--data-path, or the digits canvases (rank 0 builds them once; the others wait)."""
    if args.data_path:
        return Path(args.data_path)
    root = Path(args.canvas_dir)
    done = root / "canvas.json"
    if dist.is_main and not done.exists():
        log.info(f"[data] building the digits canvases in {root}")
        info = canvas.build_canvases(root)
        atomic_write(done, lambda tmp: Path(tmp).write_text(json.dumps(info)))
    barrier()
    return root / key


def starting_point(args, kind: str, model_class, make_config):
    """(model, source): the dense model of a --finetune checkpoint of `kind`; else a new one
    whose encoder is --finetune's ADDP encoder (loaded strictly) or --model's at random init."""
    if args.finetune:
        models = load_components(args.finetune)
        if kind in models:
            return models[kind], f"{args.finetune} [{kind}]"
        if "addp" not in models:
            raise CheckpointError(f"{args.finetune} holds no ADDP encoder (it holds: {', '.join(models)})")
        if args.eval_only and not args.resume:
            raise AddpError(f"--eval-only evaluates a trained {kind}, but {args.finetune} holds a pretraining "
                            f"checkpoint (its heads would be random); give a {kind} checkpoint or --resume")
        addp_model = models["addp"]
        model = model_class(make_config(addp_model.config))
        load_encoder(model.encoder, addp_model.state_dict(), str(args.finetune))
        return model, str(args.finetune)
    return model_class(make_config(registry.preset_config(args.model))), f"random init ({args.model})"


def backbone_dict(args, addp_config, task: str) -> dict:
    return dataclasses.asdict(backbone_config_for(addp_config, args.input_size, task, args.drop_path,
                                                  args.window_size, args.rel_pos, args.abs_pos))


class Targets(list):
    """A batch's per-image target dicts; `.to(device)` moves their tensors (the Trainer's call)."""

    def to(self, device, non_blocking: bool = False) -> "Targets":
        return Targets({k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in t.items()}
                       for t in self)


def collate(items):
    images, targets, bad = zip(*items)
    labels = torch.stack(targets) if torch.is_tensor(targets[0]) else Targets(targets)
    return torch.stack(images), labels, sum(bad)


class DenseStage:
    """The Trainer's stage: layer-wise lr decay over the encoder's blocks (ViTDet / BEiT), the
    neck and heads at the full lr; no weight decay on biases, norms, position tables, tokens."""

    def __init__(self, name: str, model: nn.Module, loss_module: nn.Module, layer_decay: float):
        self.name, self.model, self.loss_module, self.layer_decay = name, model, loss_module, layer_decay

    def prepare(self, images, generator, labels) -> dict:
        return {"images": images, "targets": labels}

    def param_groups(self, weight_decay: float) -> list[dict]:
        encoder = self.model.encoder
        depth = encoder.num_layers + 1
        prefix = next(n for n, m in self.model.named_modules() if m is encoder) + "."
        groups: dict = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            layer = encoder.layer_id(name[len(prefix):]) if name.startswith(prefix) else depth
            no_decay = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "rel_pos_h", "rel_pos_w"))
            g = groups.setdefault((layer, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                      "lr_scale": self.layer_decay ** (depth - layer)})
            g["params"].append(p)
        return list(groups.values())

    def make_optimizer(self, groups, lr, betas=(0.9, 0.999)):
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))

    def compile(self) -> None:
        pass


def check_sizes(args, patch: int) -> None:
    if args.input_size % 32 or args.input_size % patch:
        raise AddpError(f"--input-size {args.input_size} must be a multiple of 32 (the pyramid's coarsest stride) "
                        f"and of the patch size {patch}")


def train_or_evaluate(args, run: engine.Run, model: nn.Module, objective: nn.Module, train_set, evaluate, *,
                      key: str, jitter: tuple) -> tuple[Trainer, dict, dict | None]:
    """(trainer, metrics, best) of a dense command's `model`: its input size checked, trained as
    a `DenseStage` with `objective` on the shared schedule and identity (plus the layer decay,
    `jitter` and the data), or only evaluated (`finetune_engine.train_or_evaluate`)."""
    check_sizes(args, model.config.backbone_config.patch_size)
    stage = DenseStage(run.command, model, objective, args.layer_decay)
    sched = engine.schedule(args, len(train_set), run.dist.world_size)
    cfg = engine.train_config(args, sched, blr=args.blr, weight_decay=args.weight_decay)
    identity = engine.run_identity(cfg, model.config, start=args.finetune, sched=sched, recipe=run.recipe,
                                   world_size=run.dist.world_size, settings={
                                       "layer_decay": args.layer_decay, "jitter": jitter,
                                       "data": args.data_path or "digits canvases"})
    trainer = Trainer(stage, cfg, run.out, run.dist, identity)
    metrics, best = engine.train_or_evaluate(trainer, train_set, evaluate, key=key, eval_every=sched["eval_every"],
                                             resume=args.resume, force=args.force, eval_only=args.eval_only,
                                             collate=collate)
    return trainer, metrics, best
