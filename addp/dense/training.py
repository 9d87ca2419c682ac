"""What `addp.detect` and `addp.segment` share: their flags, the start of a run, the encoder
to start from, the training stage (layer-wise lr decay AdamW on `trainer.Trainer`), the data
loader, and training with the periodic evaluation that keeps `checkpoint-best` /
`checkpoint-last`."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..models import registry
from ..training import recipes
from ..errors import CheckpointError
from ..models.checkpoint import load_components, save_checkpoint
from ..cli import (ArgumentParser, add_runtime_args, existing_file, fraction, integer, non_negative_float, non_negative_int,
                   number, output_folder, positive_float, positive_int)
from ..training.data import StepBatchSampler
from ..runtime.distributed import DistInfo, barrier, init_distributed
from ..runtime.tuning import tune_for_device
from ..errors import AddpError
from ..runs.files import atomic_write, remove_stale_temp_files
from ..training.config import TrainConfig
from ..training.trainer import Trainer
from . import canvas
from .backbone import backbone_config_for, load_encoder

log = logging.getLogger("addp.dense")


def add_dense_args(p: ArgumentParser, command: str, steps: int, blr: float, layer_decay: float) -> None:
    p.add_argument("--recipe", default=None, choices=recipes.names(command),
                   help="the paper's appendix settings for ViT-B/L (explicit flags win)")
    p.add_argument("--finetune", default=None,
                   help="encoder to start from: our ADDP checkpoint, addp-vit-*-16.pth, a folder or a Hub id; "
                        "or a checkpoint of this command's model (continue from it)")
    p.add_argument("--model", default="addp_vit_small", choices=registry.list_models("addp"),
                   help="ADDP preset whose encoder is built at random init when no --finetune is given")
    p.add_argument("--data-path", default=None, help="dataset root; default: the digits canvases (built once)")
    p.add_argument("--canvas-dir", default="output/dense-canvas", help="where the digits canvases are built")
    p.add_argument("--input-size", type=positive_int, default=None, help="default 96 on the canvases")
    p.add_argument("--output-dir", type=output_folder, default=f"output/{command}")
    p.add_argument("--steps", type=positive_int, default=steps)
    p.add_argument("--epochs", type=positive_float, default=None, help="training length in epochs (replaces --steps)")
    p.add_argument("--warmup-steps", type=non_negative_int, default=None, help="default: 5%% of the steps")
    p.add_argument("--eval-every", type=non_negative_int, default=0, help="evaluate every N steps (0: at the end)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="per process and micro-step")
    p.add_argument("--accum-steps", type=positive_int, default=1)
    p.add_argument("--global-batch", type=positive_int, default=None, help="sets --batch-size from the world size")
    p.add_argument("--blr", type=positive_float, default=blr, help="lr = blr * global batch / 256")
    p.add_argument("--lr", type=positive_float, default=None, help="absolute lr (overrides --blr)")
    p.add_argument("--min-lr", type=non_negative_float, default=0.0)
    p.add_argument("--layer-decay", type=number(0, 1, low_open=True), default=layer_decay)
    p.add_argument("--weight-decay", type=non_negative_float, default=0.05)
    p.add_argument("--drop-path", type=fraction, default=0.1)
    p.add_argument("--window-size", type=positive_int, default=None,
                   help="window of the window-attention blocks (default 14 for patch 16, else the pretraining grid)")
    p.add_argument("--no-rel-pos", dest="rel_pos", action="store_false", help="no relative position bias")
    p.add_argument("--jitter", type=positive_float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="training scale jitter range")
    p.add_argument("--beta1", type=fraction, default=0.9)
    p.add_argument("--beta2", type=fraction, default=0.999)
    p.add_argument("--clip-grad", type=non_negative_float, default=None)
    add_runtime_args(p, precision="fp32")
    p.add_argument("--eval-only", action="store_true", help="evaluate --finetune (or --resume) and stop")
    p.add_argument("--log-every", type=positive_int, default=20)
    p.add_argument("--ckpt-every", type=positive_int, default=500)
    p.add_argument("--num-workers", type=integer(0, 256), default=0)
    p.add_argument("--resume", type=existing_file, default=None, help="a checkpoint.pt of this run to continue from")
    p.add_argument("--force", action="store_true", help="start over in an output folder of another run")


def resolve_recipe(args, command: str) -> dict | None:
    if not args.recipe:
        return None
    explicit = getattr(args, "explicit", set())
    filled = recipes.apply(args, args.recipe, command, explicit)
    log.info(recipes.describe(args.recipe, filled, explicit))
    return {"name": args.recipe, "source": recipes.RECIPES[args.recipe].source, "filled": filled}


def start_run(args, command: str) -> tuple[DistInfo, dict | None, Path, float]:
    """What a dense command does first: processes, the device's settings, the seed, the recipe,
    the batch split and the run folder's leftover temp files. Returns (dist, recipe, output
    folder, start time)."""
    dist = init_distributed(args.device)
    tune_for_device(dist.device)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    recipe = resolve_recipe(args, command)
    line = recipes.split_global_batch(args, dist.world_size, getattr(args, "explicit", set()))
    if line:
        log.info(line)
    out = Path(args.output_dir)
    if dist.is_main:
        remove_stale_temp_files(out)
    return dist, recipe, out, started


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
        addp_model = models["addp"]
        model = model_class(make_config(addp_model.config))
        load_encoder(model.encoder, addp_model.state_dict(), str(args.finetune))
        return model, str(args.finetune)
    return model_class(make_config(registry.preset_config(args.model))), f"random init ({args.model})"


def backbone_dict(args, addp_config, task: str) -> dict:
    import dataclasses
    return dataclasses.asdict(backbone_config_for(addp_config, args.input_size, task, args.drop_path,
                                                  args.window_size, args.rel_pos))


class Targets(list):
    """A batch's per-image target dicts; `.to(device)` moves their tensors (the Trainer's call)."""

    def to(self, device, non_blocking: bool = False) -> "Targets":
        return Targets({k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in t.items()}
                       for t in self)


def collate(items):
    images, targets, bad = zip(*items)
    labels = torch.stack(targets) if torch.is_tensor(targets[0]) else Targets(targets)
    return torch.stack(images), labels, sum(bad)


def make_loader(dataset, batch_size: int, seed: int, rank: int, world: int, start: int, workers: int) -> DataLoader:
    sampler = StepBatchSampler(len(dataset), batch_size, seed, rank, world, start)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                      persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))


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


def train_config(args) -> TrainConfig:
    warmup = args.warmup_steps if args.warmup_steps is not None else args.steps // 20
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, accum_steps=args.accum_steps, blr=args.blr,
                       lr=args.lr, min_lr=args.min_lr, warmup_steps=min(warmup, args.steps - 1),
                       weight_decay=args.weight_decay, betas=(args.beta1, args.beta2), clip_grad=args.clip_grad,
                       precision=args.precision, log_every=args.log_every, ckpt_every=args.ckpt_every,
                       seed=args.seed, num_workers=args.num_workers)


class PeriodicEvaluation:
    """`evaluate(model) -> metrics` every `every` steps and at the last: writes
    checkpoint-last.safetensors and, when `key` improves, checkpoint-best.safetensors and best.json."""

    def __init__(self, trainer: Trainer, evaluate, key: str, every: int, out: Path):
        self.trainer, self.evaluate, self.key, self.every, self.out = trainer, evaluate, key, every, out
        self.best_file = out / "best.json"
        self.best = json.loads(self.best_file.read_text()) if self.best_file.exists() else None
        self.last: dict | None = None

    def __call__(self, step: int) -> dict | None:
        if step != self.trainer.cfg.steps and (not self.every or step % self.every):
            return None
        import copy
        model = self.trainer.final_model()
        metrics = self.last = self.evaluate(model)
        self.trainer.model.train()
        improved = self.best is None or metrics[self.key] > self.best[self.key]
        if improved:
            self.best = {"step": step, **metrics}
        if self.trainer.dist.is_main:
            save_checkpoint(self.out / "checkpoint-last.safetensors", copy.deepcopy(model).cpu())
            if improved:
                save_checkpoint(self.out / "checkpoint-best.safetensors", copy.deepcopy(model).cpu())
                text = json.dumps(self.best, indent=1)
                atomic_write(self.best_file, lambda tmp: Path(tmp).write_text(text))
            log.info(f"[{self.trainer.stage.name}] step {step}: {self.key} {metrics[self.key]:.2f} "
                     f"(best {self.best[self.key]:.2f} at step {self.best['step']})")
        return {k: v for k, v in metrics.items() if isinstance(v, float)}


def train_or_evaluate(args, trainer: Trainer, train_set, run_eval, key: str, report: dict) -> dict:
    """The metrics of the run: with --eval-only those of its weights as they are (after
    --resume, when given); else after training with the periodic evaluation (`key` picks the
    best), adding the steps and the best metrics to `report`."""
    if args.eval_only:
        if args.resume:
            trainer.load(Path(args.resume))
        return run_eval(trainer.final_model())
    cfg, dist = trainer.cfg, trainer.dist
    trainer.maybe_resume(args.resume, args.force)
    periodic = PeriodicEvaluation(trainer, run_eval, key, args.eval_every, trainer.out)
    trainer.fit(lambda start: make_loader(train_set, cfg.batch_size, cfg.seed, dist.rank, dist.world_size,
                                          start, cfg.num_workers), on_step=periodic)
    report.update(steps=cfg.steps, best=periodic.best)
    return periodic.last or run_eval(trainer.final_model())


def check_sizes(args, patch: int) -> None:
    if args.input_size % 32 or args.input_size % patch:
        raise AddpError(f"--input-size {args.input_size} must be a multiple of 32 (the pyramid's coarsest stride) "
                        f"and of the patch size {patch}")
