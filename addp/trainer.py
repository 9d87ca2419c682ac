"""The training loop shared by every stage (tokenizer, token predictor, ADDP).

A stage gives: `model` (the trained module, what gets saved), `loss_module` (wraps the model,
`forward(**inputs) -> scalar loss`) and `prepare(images, generator) -> inputs` (the
no-grad part: tokenizing, masking, the diffusion process). The loop adds AdamW with weight
decay groups, a per-iteration cosine schedule with warm-up, gradient accumulation and
clipping, autocast (bf16, or fp16 with a grad scaler), EMA, torch.compile, DDP, progress,
TensorBoard + JSONL logs and atomic, exactly resumable checkpoints. Losses stay on the
device between log steps: no host synchronisation per step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from tqdm import tqdm

from .checkpoint import atomic_write
from .distributed import DistInfo, all_reduce_mean, barrier
from .registry import AddpError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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
        if self.precision not in PRECISIONS:
            raise AddpError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.steps < 1 or self.batch_size < 1 or self.accum_steps < 1:
            raise AddpError("steps, batch size and accumulation steps must be at least 1")
        if not 0 <= self.warmup_steps < self.steps:
            raise AddpError(f"warm-up ({self.warmup_steps} steps) must be shorter than the run ({self.steps})")

    def global_batch(self, world_size: int) -> int:
        return self.batch_size * self.accum_steps * world_size

    def base_lr(self, world_size: int) -> float:
        return self.lr if self.lr is not None else self.blr * self.global_batch(world_size) / 256


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Trainer:
    def __init__(self, stage, config: TrainConfig, out_dir: Path, dist: DistInfo, identity: dict):
        self.stage, self.cfg, self.out, self.dist = stage, config, Path(out_dir), dist
        self.identity = identity
        self.model = stage.model.to(dist.device)
        self.loss_module = stage.loss_module.to(dist.device)
        self.lr = config.base_lr(dist.world_size)
        # Optional stage hooks: `param_groups(weight_decay)` (e.g. layer-wise lr decay, with
        # "lr_scale" per group) and `make_optimizer(groups, lr)` (e.g. LARS); default AdamW.
        if hasattr(stage, "param_groups"):
            groups = stage.param_groups(config.weight_decay)
        else:
            groups = param_groups_weight_decay(self.model, config.weight_decay)
        if hasattr(stage, "make_optimizer"):
            self.optimizer = stage.make_optimizer(groups, self.lr)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=tuple(config.betas),
                                               fused=dist.device.type in ("cuda", "cpu"))
        self.prepare_takes_labels = "labels" in inspect.signature(stage.prepare).parameters
        warm = config.warmup_steps
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=config.steps - warm, lr_min=config.min_lr,
                                           warmup_t=warm, warmup_lr_init=self.lr * 1e-3 if warm else self.lr,
                                           warmup_prefix=True, t_in_epochs=False)
        self.amp_dtype = autocast_dtype(config.precision, dist.device)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = ModelEmaV3(self.model, decay=config.ema_decay) if config.ema_decay > 0 else None
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + dist.rank)
        self.losses = torch.zeros(config.steps, device=dist.device)
        self.step = 0
        self.skipped = 0
        step_module = self.loss_module
        if dist.enabled:
            step_module = nn.parallel.DistributedDataParallel(
                step_module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        self.step_module = torch.compile(step_module) if config.compile else step_module
        if config.compile and hasattr(stage, "compile"):
            stage.compile()  # e.g. the frozen networks of the ADDP stage

    # -- checkpoints -------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "step": self.step,
            "skipped": self.skipped,
            "losses": self.losses.cpu(),
            "rng": {"torch": torch.get_rng_state(), "generator": self.generator.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "identity": json.dumps(self.identity, sort_keys=True),
        }

    def save(self) -> None:
        if self.dist.is_main:
            state = self.state_dict()
            atomic_write(self.checkpoint_path, lambda tmp: torch.save(state, tmp))
        barrier()

    def load(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AddpError(f"cannot resume from {path}: {str(e).splitlines()[0][:200]}") from None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema and state["ema"] is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.step, self.skipped = state["step"], state["skipped"]
        self.losses.copy_(state["losses"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["generator"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def maybe_resume(self, resume: str | None, force: bool) -> None:
        """Explicit --resume, else auto-resume from the output folder if its run matches."""
        path = Path(resume) if resume else self.checkpoint_path
        run_file = self.out / "run.json"
        if resume is None and not path.exists():
            self._write_identity(run_file)
            return
        if not path.exists():
            raise AddpError(f"--resume checkpoint not found: {path}")
        saved = json.loads(torch.load(path, map_location="cpu", weights_only=True)["identity"])
        if saved != self.identity:
            if not force:
                diff = sorted(k for k in set(saved) | set(self.identity) if saved.get(k) != self.identity.get(k))
                raise AddpError(f"{self.out} holds a run of another config (differs in: {', '.join(diff)}); "
                                "pass --force to start over there, or pick another --output-dir")
            self._write_identity(run_file)
            return
        self.load(path)

    def _write_identity(self, run_file: Path) -> None:
        if self.dist.is_main:
            text = json.dumps(self.identity, indent=1, sort_keys=True)
            atomic_write(run_file, lambda tmp: Path(tmp).write_text(text))

    # -- the loop ----------------------------------------------------------------------
    def fit(self, make_loader, on_step=None) -> dict:
        """Train to `steps`; `make_loader(start_micro_batch)` returns an endless loader.
        `on_step(step)`, called on every rank after each step's checkpointing, may return
        values to log at that step (e.g. a periodic evaluation)."""
        cfg = self.cfg
        log = _Log(self.out, self.dist.is_main)
        batches = iter(make_loader(self.step * cfg.accum_steps))
        window_start, window_images = time.perf_counter(), 0
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.stage.name, disable=not self.dist.is_main,
                   dynamic_ncols=True, leave=True)
        skipped = torch.zeros((), dtype=torch.int64)
        self.model.train()
        while self.step < cfg.steps:
            self.scheduler.step_update(self.step)
            step_loss, images_seen, bad = self.train_step(batches)
            skipped += bad
            window_images += images_seen
            self.losses[self.step] = step_loss
            self.step += 1
            bar.update(1)
            last = self.step == cfg.steps
            if self.step % cfg.log_every == 0 or last:
                n = min(cfg.log_every, self.step)
                mean_loss = float(all_reduce_mean(self.losses[self.step - n:self.step].mean()))
                elapsed = time.perf_counter() - window_start
                self.skipped += int(skipped)
                skipped.zero_()
                rate = window_images * self.dist.world_size / max(elapsed, 1e-9)
                lr = self.optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
                log.write(self.step, {"loss": mean_loss, "lr": lr, "images_per_s": rate, "skipped": self.skipped})
                window_start, window_images = time.perf_counter(), 0
            if self.step % cfg.ckpt_every == 0 or last:
                self.save()
            if on_step is not None:
                values = on_step(self.step)
                if values:
                    log.write(self.step, values)
        bar.close()
        log.close()
        if self.skipped and self.dist.is_main:
            print(f"[{self.stage.name}] skipped {self.skipped} unreadable images")
        return {"losses": self.losses.cpu().tolist()}

    def train_step(self, batches) -> tuple[torch.Tensor, int, torch.Tensor]:
        """One optimizer step over ``accum_steps`` micro-batches drawn from the iterator
        ``batches`` of (images, labels, unreadable count). Returns the step's loss (a device
        scalar: no host sync), the number of images and the unreadable count."""
        cfg, dev = self.cfg, self.dist.device
        step_loss = torch.zeros((), device=dev)
        images_seen, skipped = 0, torch.zeros((), dtype=torch.int64)
        for micro in range(cfg.accum_steps):
            images, labels, bad = next(batches)
            skipped += bad
            images = images.to(dev, non_blocking=True)
            # the frozen passes of `prepare` (tokenizer, predictor) run under the same autocast
            # as the model, as in the official code
            autocast = torch.autocast(dev.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
            with autocast:
                if self.prepare_takes_labels:
                    inputs = self.stage.prepare(images, self.generator, labels=labels.to(dev, non_blocking=True))
                else:
                    inputs = self.stage.prepare(images, self.generator)
            sync = micro == cfg.accum_steps - 1 or not self.dist.enabled
            with self._no_sync(sync), autocast:
                loss = self.step_module(**inputs) / cfg.accum_steps
            self.scaler.scale(loss).backward()
            step_loss += loss.detach()
            images_seen += images.shape[0]
        if cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update(self.model, step=self.step)
        return step_loss, images_seen, skipped

    def _no_sync(self, sync: bool):
        module = getattr(self.step_module, "_orig_mod", self.step_module)
        if sync or not isinstance(module, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return module.no_sync()

    def final_model(self) -> nn.Module:
        """The weights to export: the EMA copy when EMA is on, else the trained model."""
        return self.ema.module if self.ema else self.model


class _Log:
    """JSONL + TensorBoard scalars, written by rank 0 only."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            out.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(out / "log.jsonl", "a")
            self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def identity_of(*configs) -> dict:
    """The run-defining settings: what must match for a checkpoint to be resumed."""
    out = {}
    for c in configs:
        out.update(dataclasses.asdict(c) if dataclasses.is_dataclass(c) else dict(c))
    for volatile in ("log_every", "ckpt_every", "num_workers", "compile"):
        out.pop(volatile, None)
    return json.loads(json.dumps(out, default=str))
