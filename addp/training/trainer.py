"""The training loop shared by every stage (tokenizer, token predictor, ADDP).

A stage (the `Stage` protocol) gives: `model` (the trained module, what gets saved),
`loss_module` (wraps the model, `forward(**inputs) -> scalar loss`) and
`prepare(images, generator, labels) -> inputs` (the no-grad part: tokenizing, masking, the
diffusion process), and may replace the parameter groups, the optimizer and what `--compile`
compiles besides the training step. The loop adds AdamW with weight
decay groups, a per-iteration cosine schedule with warm-up, gradient accumulation and
clipping, autocast (bf16, or fp16 with a grad scaler), EMA, torch.compile, DDP, progress,
TensorBoard + JSONL logs and atomic, exactly resumable checkpoints. Losses stay on the
device between log steps: no host synchronisation per step.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.fx.experimental._config as fx_config
import torch.nn as nn
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from ..models.state import check_finite
from ..models.weights_io import check_regular_file
from .data import with_worker_causes
from ..runtime.distributed import DistInfo, all_reduce_mean, barrier
from ..errors import AddpError, first_line
from ..runs.files import atomic_write
from ..runtime.precision import autocast, autocast_dtype
from ..runs.log import RunLog
from ..runs.progress import Progress
from .config import Stage, TrainConfig
from ..runs.records import describe_differences

WARMUP_START = 1e-3  # the warm-up starts at this fraction of the peak lr (not 0: the first step moves)
CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "ema", "step", "skipped", "losses", "rng", "identity")

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, stage: Stage, config: TrainConfig, out_dir: Path, dist: DistInfo, identity: dict):
        self.stage, self.cfg, self.out, self.dist = stage, config, Path(out_dir), dist
        self.identity = identity
        self.model = stage.model.to(dist.device)
        self.loss_module = stage.loss_module.to(dist.device)
        self.lr = config.base_lr(dist.world_size)
        self.optimizer = stage.make_optimizer(stage.param_groups(config.weight_decay), self.lr, config.betas)
        warm = config.warmup_steps
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=config.steps - warm, lr_min=config.min_lr,
                                           warmup_t=warm, warmup_lr_init=self.lr * WARMUP_START if warm else self.lr,
                                           warmup_prefix=True, t_in_epochs=False)
        self.amp_dtype = autocast_dtype(config.precision, dist.device, training=True)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = ModelEmaV3(self.model, decay=config.ema_decay) if config.ema_decay > 0 else None
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + dist.rank)
        self.losses = torch.zeros(config.steps, device=dist.device)
        self.step = 0
        self.skipped = 0
        self.last_good: tuple[int, Path] | None = None  # (step, file) of the last checkpoint written or loaded
        step_module = self.loss_module
        if dist.enabled:
            step_module = nn.parallel.DistributedDataParallel(
                step_module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        self.step_module = torch.compile(step_module) if config.compile else step_module
        if config.compile:
            stage.compile()

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
        self._check_weights()
        if self.dist.is_main:
            state = self.state_dict()
            atomic_write(self.checkpoint_path, lambda tmp: torch.save(state, tmp))
        self.last_good = (self.step, self.checkpoint_path)
        barrier()

    def load(self, path: Path) -> None:
        self._load_state(read_training_checkpoint(path), path)

    def _load_state(self, state: dict, path: Path) -> None:
        check_finite(state["model"], f"{path} [model]")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            if self.ema and state["ema"] is not None:
                self.ema.module.load_state_dict(state["ema"])
            self.losses.copy_(state["losses"])
            torch.set_rng_state(state["rng"]["torch"])
            self.generator.set_state(state["rng"]["generator"])
            if state["rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise AddpError(f"cannot resume from {path}: it does not fit this run ({first_line(e)})") from None
        self.step, self.skipped = int(state["step"]), int(state["skipped"])
        self.last_good = (self.step, Path(path))

    def maybe_resume(self, resume: str | None, force: bool) -> None:
        """Explicit --resume, else auto-resume from the output folder if its run matches.

        An unreadable checkpoint in the output folder is an error, or with `force` the stage
        starts over (the file is replaced at the first save); an unreadable --resume file is
        always an error."""
        path = Path(resume) if resume else self.checkpoint_path
        run_file = self.out / "run.json"
        if resume is None and not path.exists():
            self._write_identity(run_file)
            return
        if not path.exists():
            raise AddpError(f"--resume checkpoint not found: {path}")
        try:
            state = read_training_checkpoint(path)
            if state["step"] > self.cfg.steps:
                raise AddpError(f"cannot resume from {path}: it is at step {state['step']} of a run of "
                                f"{self.cfg.steps} steps")
        except AddpError as e:
            if resume or not force:
                fix = "" if resume else "; pass --force to start this stage over"
                raise AddpError(f"{e}{fix}") from None
            self._say(f"{e}; --force: starting over")
            self._write_identity(run_file)
            return
        saved = state["identity"]
        if saved != self.identity:
            if not force:
                diff = describe_differences(saved, self.identity)
                raise AddpError(f"{self.out} holds a run of another config ({diff}); "
                                "pass --force to start over there, or pick another --output-dir")
            self._write_identity(run_file)
            return
        self._load_state(state, path)

    def _write_identity(self, run_file: Path) -> None:
        if self.dist.is_main:
            text = json.dumps(self.identity, indent=1, sort_keys=True)
            atomic_write(run_file, lambda tmp: Path(tmp).write_text(text))

    def _say(self, text: str) -> None:
        if self.dist.is_main:
            log.info(f"[{self.stage.name}] {text}")

    # -- finite checks -----------------------------------------------------------------
    def _check_weights(self) -> None:
        """Refuse to checkpoint non-finite weights (all ranks hold the same weights)."""
        named = [(k, t) for k, t in self.model.state_dict().items() if t.is_floating_point()]
        if not named or bool(torch.stack([torch.isfinite(t).all() for _, t in named]).all()):
            return
        bad = next(k for k, t in named if not bool(torch.isfinite(t).all()))
        raise self._diverged(f"weight {bad} is not finite")

    def _diverged(self, what: str) -> AddpError:
        if self.last_good is None:
            kept = "no checkpoint was written"
        else:
            kept = f"the last good checkpoint (step {self.last_good[0]}) stays in {self.last_good[1]}"
        return AddpError(f"[{self.stage.name}] training diverged at step {self.step}: {what}; {kept}; "
                         "lower the learning rate")

    # -- the loop ----------------------------------------------------------------------
    def fit(self, make_loader, on_step=None) -> dict:
        """Train to `steps`; `make_loader(start_micro_batch)` returns an endless loader.
        `on_step(step)`, called on every rank after each step's checkpointing, may return
        values to log at that step (e.g. a periodic evaluation)."""
        cfg = self.cfg
        metrics = RunLog(self.out, self.dist.is_main, self.step)
        batches = with_worker_causes(make_loader(self.step * cfg.accum_steps))
        window_start, window_images = time.perf_counter(), 0
        bar = Progress(total=cfg.steps, initial=self.step, desc=self.stage.name, unit="step",
                       disable=not self.dist.is_main)
        skipped = torch.zeros((), dtype=torch.int64)
        self.model.train()
        try:
            while self.step < cfg.steps:
                self.scheduler.step_update(self.step)
                step_loss, images_seen, bad = self.train_step(batches)
                skipped += bad
                window_images += images_seen
                self.losses[self.step] = step_loss
                self.step += 1
                last = self.step == cfg.steps
                if self.step % cfg.log_every == 0 or last:
                    n = min(cfg.log_every, self.step)
                    mean_loss = float(all_reduce_mean(self.losses[self.step - n:self.step].mean()))
                    if not math.isfinite(mean_loss):
                        raise self._diverged(f"the mean loss of steps {self.step - n + 1}-{self.step} is {mean_loss}")
                    elapsed = time.perf_counter() - window_start
                    self.skipped += int(skipped)
                    skipped.zero_()
                    rate = window_images * self.dist.world_size / max(elapsed, 1e-9)
                    lr = self.optimizer.param_groups[0]["lr"]
                    bar.set_postfix(**{"img/s": f"{rate:.1f}", "loss": f"{mean_loss:.4f}", "lr": f"{lr:.2e}"})
                    metrics.write(self.step, {"loss": mean_loss, "lr": lr, "images_per_s": rate, "skipped": self.skipped})
                    window_start, window_images = time.perf_counter(), 0
                bar.update(1)
                if self.step % cfg.ckpt_every == 0 or last:
                    self.save()
                if on_step is not None:
                    values = on_step(self.step)
                    if values:
                        metrics.write(self.step, values)
        finally:
            bar.close()
            metrics.close()
        if self.skipped and self.dist.is_main:
            log.info(f"[{self.stage.name}] skipped {self.skipped} unreadable images")
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
            with autocast(dev, self.amp_dtype):
                inputs = self.stage.prepare(images, self.generator, labels.to(dev, non_blocking=True))
            sync = micro == cfg.accum_steps - 1 or not self.dist.enabled
            with self._compile_shapes():
                with self._no_sync(sync), autocast(dev, self.amp_dtype):
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

    def _compile_shapes(self):
        """Under --compile: the count of reliable tokens changes from step to step; after its
        first change the step compiles one graph for every count, but by default that graph
        excludes the counts 0 and 1: each would compile again the first time a batch draws it,
        in the middle of a run. Size-oblivious shape reasoning keeps them in the general graph."""
        if not self.cfg.compile:
            return contextlib.nullcontext()
        return fx_config.patch(backed_size_oblivious=True)

    def _no_sync(self, sync: bool):
        module = getattr(self.step_module, "_orig_mod", self.step_module)
        if sync or not isinstance(module, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return module.no_sync()

    def final_model(self) -> nn.Module:
        """The weights to export: the EMA copy when EMA is on, else the trained model."""
        return self.ema.module if self.ema else self.model


def read_training_checkpoint(path: Path) -> dict:
    """A training checkpoint.pt (weights_only) with its run identity parsed; one-line errors."""
    try:
        check_regular_file(path, "training checkpoint")
    except AddpError as e:
        raise AddpError(f"cannot resume: {e}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, a folder, pickled objects, ...
        raise AddpError(f"cannot resume from {path}: not a readable checkpoint ({first_line(e)})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise AddpError(f"cannot resume from {path}: not a training checkpoint (lacks {', '.join(missing)})")
    try:
        identity = json.loads(state["identity"])
    except (TypeError, ValueError):
        identity = None
    if not isinstance(identity, dict) or not isinstance(state["model"], dict):
        raise AddpError(f"cannot resume from {path}: its run identity or model weights are malformed")
    for key in ("step", "skipped"):
        value = state[key]
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise AddpError(f"cannot resume from {path}: its {key} is {str(value)[:40]!r}, not a count")
        state[key] = value
    return {**state, "identity": identity}


