"""What the training loop is given: `TrainConfig` (the options of one stage), the `Stage`
protocol (the model, its loss and how a batch becomes its inputs), and `identity_of`, the
settings that must match for a run to be resumed."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay

from ..errors import AddpError
from . import recipes
from .data import default_workers
from ..runtime.precision import PRECISIONS
from ..models.registry import check_config


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64  # per process and micro-step
    accum_steps: int = 1
    blr: float = 1.5e-4  # lr = blr * global batch / 256 (MAE) unless lr is given
    lr: float | None = None
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)
    clip_grad: float | None = 3.0
    precision: str = "auto"
    ema_decay: float = 0.0  # 0 disables EMA
    compile: bool = False
    log_every: int = 20
    ckpt_every: int = 500
    seed: int = 0
    num_workers: int = 0

    def __post_init__(self):
        check_config(self, ints=dict(steps=1, batch_size=1, accum_steps=1, warmup_steps=0, log_every=1, ckpt_every=1,
                                     seed=0, num_workers=0),
                     fractions=("ema_decay",), positive=("blr",) + (("lr",) if self.lr is not None else ()),
                     choices={"precision": PRECISIONS})
        for name in ("min_lr", "weight_decay") + (("clip_grad",) if self.clip_grad is not None else ()):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
                raise AddpError(f"TrainConfig: {name} must be a finite number >= 0, got {value!r}")
        if not 0 <= self.warmup_steps < self.steps:
            raise AddpError(f"warm-up ({self.warmup_steps} steps) must be shorter than the run ({self.steps})")

    def global_batch(self, world_size: int) -> int:
        return self.batch_size * self.accum_steps * world_size

    def base_lr(self, world_size: int) -> float:
        return self.lr if self.lr is not None else self.blr * self.global_batch(world_size) / 256



class Stage(Protocol):
    """What `Trainer` trains. Subclasses inherit the defaults of the last three methods."""

    name: str
    model: nn.Module  # trained and saved
    loss_module: nn.Module  # forward(**inputs) -> scalar loss

    def prepare(self, images: torch.Tensor, generator: torch.Generator, labels: torch.Tensor) -> dict:
        """The no-grad inputs of `loss_module` for a batch (tokens, masks, targets)."""
        ...

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Parameter groups of the optimizer: no decay on biases and norms."""
        return param_groups_weight_decay(self.model, weight_decay)

    def make_optimizer(self, groups: list[dict], lr: float, betas: tuple = (0.9, 0.95)) -> torch.optim.Optimizer:
        device = next(self.model.parameters()).device
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=device.type in ("cuda", "cpu"))

    def compile(self) -> None:
        """Under --compile: compile the stage's frozen passes too (none by default)."""



def identity_of(*configs) -> dict:
    """The run-defining settings: what must match for a checkpoint to be resumed."""
    out = {}
    for c in configs:
        out.update(dataclasses.asdict(c) if dataclasses.is_dataclass(c) else dict(c))
    for volatile in ("log_every", "ckpt_every", "num_workers", "compile"):
        out.pop(volatile, None)
    return json.loads(json.dumps(out, default=str))


def step_schedule(args, num_samples: int, world_size: int, default_warmup) -> dict:
    """The length of a run in optimizer steps, and its warm-up, from epochs where the options give
    epochs (`recipes.epochs_to_steps`). `default_warmup(convert, steps)` returns (warm-up steps,
    the same in epochs or None) when neither --warmup-epochs nor --warmup-steps is given;
    `convert(epochs, at_least=1)` turns epochs of this run's data into steps."""
    def convert(epochs: float, at_least: int = 1) -> int:
        return recipes.epochs_to_steps(epochs, num_samples, args.batch_size, world_size, args.accum_steps, at_least)

    out = {"global_batch": args.batch_size * args.accum_steps * world_size, "dataset_images": num_samples}
    steps = args.steps
    if args.epochs is not None:
        steps, out["epochs"] = convert(args.epochs), args.epochs
    if args.warmup_epochs is not None:
        warmup, out["warmup_epochs"] = convert(args.warmup_epochs, 0), args.warmup_epochs
    elif args.warmup_steps is not None:
        warmup = args.warmup_steps
    else:
        warmup, epochs = default_warmup(convert, steps)
        if epochs is not None:
            out["warmup_epochs"] = epochs
    given = {"warmup_epochs", "warmup_steps"} & getattr(args, "explicit", set())  # on the command line
    if given and warmup >= steps:
        what = (f"--warmup-epochs {args.warmup_epochs:g} ({warmup} steps)" if args.warmup_epochs is not None
                else f"--warmup-steps {warmup}")
        raise AddpError(f"warm-up {what} must be shorter than the run ({steps} steps)")
    out.update(steps=steps, warmup_steps=min(warmup, steps - 1))  # a default warm-up fits a short run
    return out


def train_config_from_args(args, **fields) -> TrainConfig:
    """A TrainConfig from the options every training command shares (batch, lr floor, betas,
    clipping, precision, EMA, compile where the command takes it, logging, seed, workers);
    `fields` sets the rest."""
    workers = args.num_workers if args.num_workers is not None else (default_workers() if args.data_path else 0)
    shared = dict(batch_size=args.batch_size, accum_steps=args.accum_steps, lr=args.lr, min_lr=args.min_lr,
                  betas=(args.beta1, args.beta2), clip_grad=args.clip_grad, precision=args.precision,
                  ema_decay=args.ema_decay, compile=getattr(args, "compile", False), log_every=args.log_every,
                  ckpt_every=args.ckpt_every, seed=args.seed, num_workers=workers)
    return TrainConfig(**{**shared, **fields})
