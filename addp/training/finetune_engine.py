"""What the fine-tuning commands (`addp.finetune`, `addp.detect`, `addp.segment`) share: their
training flags, the start of a run (processes, seed, recipe, batch split, the run folder's
lock), the schedule in steps or epochs, the run identity a resume must match, the periodic
evaluation that keeps `checkpoint-best` / `checkpoint-last`, and training or evaluating.

A command declares its own flags after `add_training_args`, builds its data, model and
`Stage`, and hands them to `train_or_evaluate` with its `evaluate(model) -> metrics`.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import recipes
from .config import TrainConfig, identity_of, step_schedule, train_config_from_args
from .data import collate as image_collate, make_loader
from .trainer import Trainer
from ..cli import (ArgumentParser, add_runtime_args, existing_file, existing_path, fraction, integer,
                   non_negative_float, non_negative_int, number, output_folder, positive_float, positive_int)
from ..errors import AddpError
from ..models.checkpoint import save_checkpoint
from ..models.hub import resolve
from ..runs.files import atomic_write, sha256_path
from ..runs.lock import lock_run_folder
from ..runtime.distributed import DistInfo, init_distributed
from ..runtime.tuning import tune_for_device

log = logging.getLogger(__name__)

EVAL_EVERY_HELP = ("evaluate on the validation set every N steps and at the last step; each evaluation writes "
                   "checkpoint-last.safetensors and, when the command's key metric improves, "
                   "checkpoint-best.safetensors and best.json (0: at the last step only)")
BEST_FILES = ("best.json", "checkpoint-best.safetensors", "checkpoint-last.safetensors")

# the defaults of the shared flags a command does not set itself
TRAINING_DEFAULTS = dict(batch_size=8, min_lr=0.0, weight_decay=0.05, drop_path=0.1, beta1=0.9, beta2=0.999,
                         log_every=20, ckpt_every=500, num_workers=0)


# -- flags -------------------------------------------------------------------------------------
def add_training_args(p: ArgumentParser, command: str, *, steps: int, blr: float | None,
                      layer_decay: float | None, finetune_type: Callable[[str], str] | None = existing_path,
                      precision: str = "auto", compile: str | None = None, helps: dict[str, str] | None = None,
                      **defaults) -> None:
    """The training flags of every fine-tuning command, declared here once. `steps`, `blr`,
    `layer_decay` and `defaults` (keys of `TRAINING_DEFAULTS`) are the command's defaults (None:
    the command resolves it later and says how in `helps`); `helps` maps a flag's dest to the
    command's help text where its meaning differs; `precision` and `compile` go to
    `add_runtime_args`; `finetune_type` checks --finetune (the dense commands also take Hub ids)."""
    unknown = set(defaults) - set(TRAINING_DEFAULTS)
    if unknown:
        raise TypeError(f"add_training_args: no shared flag {', '.join(sorted(unknown))}")
    d = {**TRAINING_DEFAULTS, **defaults}
    helps = helps or {}

    def add(flag: str, help: str | None = None, **kwargs) -> None:
        dest = kwargs.get("dest", flag[2:].replace("-", "_"))
        p.add_argument(flag, help=helps.get(dest, help), **kwargs)

    add("--recipe", "a paper recipe's settings (explicit flags win)", default=None, choices=recipes.names(command))
    add("--finetune", "checkpoint to start from", type=finetune_type, default=None)
    add("--data-path", "dataset root; default: the bundled digits", default=None)
    add("--output-dir", type=output_folder, default=f"output/{command}")
    add("--steps", "training length in optimizer steps", type=positive_int, default=steps)
    add("--epochs", "training length in epochs (replaces --steps)", type=positive_float, default=None)
    add("--warmup-steps", "default: 5%% of the steps", type=non_negative_int, default=None)
    add("--warmup-epochs", "warm-up in epochs (replaces --warmup-steps)", type=non_negative_float, default=None)
    add("--eval-every", EVAL_EVERY_HELP, type=non_negative_int, default=0)
    add("--eval-every-epochs", "the same in epochs (replaces --eval-every)", type=positive_float, default=None)
    add("--batch-size", "per process and micro-step", type=positive_int, default=d["batch_size"])
    add("--accum-steps", type=positive_int, default=1)
    add("--global-batch", "images per optimizer step over all processes; sets --batch-size (or, when "
        "--batch-size is given, --accum-steps) from the world size", type=positive_int, default=None)
    add("--blr", "lr = blr * global batch / 256", type=positive_float, default=blr)
    add("--lr", "absolute lr (overrides --blr)", type=positive_float, default=None)
    add("--min-lr", type=non_negative_float, default=d["min_lr"])
    add("--layer-decay", "layer-wise lr decay (1: off)", type=number(0, 1, low_open=True), default=layer_decay)
    add("--weight-decay", type=non_negative_float, default=d["weight_decay"])
    add("--drop-path", type=fraction, default=d["drop_path"])
    add("--beta1", "AdamW beta1", type=fraction, default=d["beta1"])
    add("--beta2", "AdamW beta2", type=fraction, default=d["beta2"])
    add("--clip-grad", "gradient norm clip", type=non_negative_float, default=None)
    add("--ema-decay", "EMA of the weights (0: off)", type=fraction, default=0.0)
    add_runtime_args(p, precision=precision, compile=compile)
    add("--eval-only", "evaluate --finetune (or --resume) and stop", action="store_true")
    add("--log-every", type=positive_int, default=d["log_every"])
    add("--ckpt-every", type=positive_int, default=d["ckpt_every"])
    add("--num-workers", type=integer(0, 256), default=d["num_workers"])
    add("--resume", "a checkpoint.pt of this run to continue from", type=existing_file, default=None)
    add("--force", "start over in an output folder of another run", action="store_true")


# -- the start of a run --------------------------------------------------------------------------
def resolve_recipe(args, command: str) -> dict | None:
    """Fill in --recipe's settings (not the explicit flags); says so once. The record for run.json."""
    if not args.recipe:
        return None
    explicit = getattr(args, "explicit", set())
    filled = recipes.apply(args, args.recipe, command, explicit)
    log.info(recipes.describe(args.recipe, filled, explicit))
    return {"name": args.recipe, "source": recipes.RECIPES[args.recipe].source, "filled": filled}


@dataclass(frozen=True)
class Run:
    """A started run of a fine-tuning command."""
    command: str
    dist: DistInfo
    out: Path
    recipe: dict | None  # the recipe's record, None without --recipe
    started: float  # time.perf_counter() at the start


@contextmanager
def start_run(args, command: str) -> Iterator[Run]:
    """What a fine-tuning command does first: refuse --eval-only without weights, join the
    processes, tune the device, seed, fill in the recipe, split --global-batch, then hold the
    output folder's lock (a second run into it is refused) for the length of the block."""
    if args.eval_only and not (args.finetune or args.resume):
        raise AddpError("--eval-only evaluates trained weights: give --finetune or --resume")
    dist = init_distributed(args.device)
    tune_for_device(dist.device)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    recipe = resolve_recipe(args, command)
    line = recipes.split_global_batch(args, dist.world_size, getattr(args, "explicit", set()))
    if line:
        log.info(line)
    out = Path(args.output_dir)
    lock = lock_run_folder(out, dist.is_main)
    try:
        yield Run(command, dist, out, recipe, started)
    finally:
        if lock is not None:
            lock.release()


# -- schedule, config, identity -------------------------------------------------------------------
def schedule(args, num_train: int, world_size: int) -> dict:
    """Steps, warm-up steps (default: the first 5% of the run) and the evaluation interval, from
    epochs where they are given in epochs; an explicit warm-up not shorter than the run is refused.
    Says the conversion when there was one."""
    out = step_schedule(args, num_train, world_size, lambda convert, steps: (steps // 20, None))
    out["eval_every"] = args.eval_every
    if args.eval_every_epochs is not None:
        out["eval_every"] = recipes.epochs_to_steps(args.eval_every_epochs, num_train, args.batch_size, world_size,
                                                    args.accum_steps)
        out["eval_every_epochs"] = args.eval_every_epochs
    if {"epochs", "warmup_epochs", "eval_every_epochs"} & set(out) and not args.eval_only:
        log.info(recipes.describe_schedule(out))
    return out


def train_config(args, sched: dict, *, blr: float, weight_decay: float) -> TrainConfig:
    """The TrainConfig of a fine-tuning run: the shared flags, `schedule`'s steps and warm-up."""
    return train_config_from_args(args, steps=sched["steps"], warmup_steps=sched["warmup_steps"], blr=blr,
                                  weight_decay=weight_decay)


def run_identity(cfg: TrainConfig, model_config, *, start: str | None, sched: dict, recipe: dict | None,
                 world_size: int, settings: dict) -> dict:
    """What a checkpoint must match to be resumed: the training and model configs, the schedule,
    the recipe, the number of processes, the command's `settings`, and the starting weights
    `start`: their path and SHA-256 (a file, a folder, or a Hub id's local copy)."""
    weights = {"finetune": str(start), "finetune_sha256": sha256_path(resolve(start)) if start else None}
    run = {"schedule": sched, **({"recipe": recipe} if recipe else {}), "world_size": world_size}
    return identity_of(cfg, model_config, run, weights, settings)


# -- periodic evaluation ------------------------------------------------------------------------
class PeriodicEvaluation:
    """`evaluate(model) -> metrics` every `every` steps and at the last step (`every` 0: at the
    last step only). Each evaluation writes checkpoint-last.safetensors and, when `metrics[key]`
    improves, checkpoint-best.safetensors and best.json (atomic writes); best.json carries the
    best so far across resumes, and a run starting at step 0 clears a previous run's. Returns the
    float metrics, named `log_prefix` + name, for the run's log."""

    def __init__(self, trainer: Trainer, evaluate: Callable, *, key: str, every: int, log_prefix: str = ""):
        self.trainer, self.evaluate, self.key, self.every, self.log_prefix = trainer, evaluate, key, every, log_prefix
        self.out = trainer.out
        self.best_file = self.out / "best.json"
        self.best: dict | None = None
        self.last: dict | None = None
        if trainer.step:
            self.best = json.loads(self.best_file.read_text()) if self.best_file.exists() else None
        elif trainer.dist.is_main:
            for name in BEST_FILES:
                (self.out / name).unlink(missing_ok=True)

    def __call__(self, step: int) -> dict | None:
        if step != self.trainer.cfg.steps and (not self.every or step % self.every):
            return None
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
        return {self.log_prefix + k: v for k, v in metrics.items() if isinstance(v, float)}


def train_or_evaluate(trainer: Trainer, train_set, evaluate: Callable, *, key: str, eval_every: int,
                      resume: str | None, force: bool, eval_only: bool, collate: Callable = image_collate,
                      log_prefix: str = "") -> tuple[dict, dict | None]:
    """(metrics, best): with `eval_only`, the metrics of the weights as they are (after `resume`,
    when given) and no best; else those after training `train_set` (batches made by `collate`)
    with the periodic evaluation, and its best (`key` picks it)."""
    if eval_only:
        if resume:
            trainer.load(Path(resume))
        return evaluate(trainer.final_model()), None
    trainer.maybe_resume(resume, force)
    if trainer.step and trainer.dist.is_main:
        log.info(f"[{trainer.stage.name}] resuming at step {trainer.step} from {trainer.checkpoint_path}")
    periodic = PeriodicEvaluation(trainer, evaluate, key=key, every=eval_every, log_prefix=log_prefix)
    cfg, dist = trainer.cfg, trainer.dist
    trainer.fit(lambda start: make_loader(train_set, cfg.batch_size, cfg.seed, dist.rank, dist.world_size, start,
                                          cfg.num_workers, collate_fn=collate), on_step=periodic)
    return periodic.last or evaluate(trainer.final_model()), periodic.best
