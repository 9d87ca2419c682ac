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
import logging
import sys
import time
from pathlib import Path

import torch

from .training import recipes
from .models import registry
from .models.checkpoint import save_checkpoint
from .models.classifier import GLOBAL_POOLS
from .training.data import make_loader
from .runtime.distributed import init_distributed
from .runtime.tuning import tune_for_device
from .cli import (RESUMABLE, ArgumentParser, add_runtime_args, existing_file, existing_path, fraction, integer,
                  non_negative_float, non_negative_int, number, output_folder, positive_float, positive_int,
                  probability, run_command)
from .errors import AddpError, first_line
from .runs.files import sha256_path, write_json
from .runs.lock import lock_run_folder
from .training.config import identity_of
from .training.trainer import Trainer
from .training.finetune_data import build_datasets
from .training.finetuning import (PROBE_OPTIMIZERS, ClassifierStage, PeriodicEvaluation, build_classifier_for,
                                  evaluate, resolve_defaults, resolve_recipe, schedule, train_config)


log = logging.getLogger("addp.finetune")  # a fixed name: run as `python -m`, __name__ is "__main__"


def auto_augment(text: str) -> str:
    """An argparse type: a timm auto-augment policy name ("" or "none": no auto-augment)."""
    if text.strip().lower() in ("", "none"):
        return ""
    from timm.data import create_transform
    try:
        create_transform(32, is_training=True, auto_augment=text)
    except Exception as e:  # timm asserts on an unknown policy
        raise argparse.ArgumentTypeError(f"not a timm auto-augment policy: {text!r} ({first_line(e)}), e.g. "
                                         "rand-m9-mstd0.5-inc1, augmix-m5, v0 or none") from None
    return text


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
    p.add_argument("--aa", default=None, type=auto_augment,
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
    add_runtime_args(p, compile="the training step")
    p.add_argument("--log-every", type=positive_int, default=50)
    p.add_argument("--ckpt-every", type=positive_int, default=500)
    p.add_argument("--num-workers", type=integer(0, 256), default=None,
                   help="default: 0 for digits, min(8, CPU cores) for folders")
    p.add_argument("--resume", type=existing_file, default=None, help="a checkpoint.pt of this run to continue from")
    p.add_argument("--force", action="store_true", help="start over in an output folder of another run")
    return p


def main(args) -> dict:
    dist = init_distributed(args.device)
    tune_for_device(dist.device)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    say = log.info
    if args.eval_only and not (args.finetune or args.resume):
        raise AddpError("--eval-only evaluates trained weights: give --finetune or --resume")
    recipe = resolve_recipe(args, say)
    line = recipes.split_global_batch(args, dist.world_size, getattr(args, "explicit", set()))
    if line:
        say(line)
    out = Path(args.output_dir)
    lock = lock_run_folder(out, dist.is_main)
    try:
        return _finetune(args, dist, out, recipe, started)
    finally:
        if lock is not None:
            lock.release()


def _finetune(args, dist, out: Path, recipe, started: float) -> dict:
    say = log.info
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
        "finetune": str(args.finetune), "finetune_sha256": sha256_path(args.finetune) if args.finetune else None,
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
        # an evaluation of a run's weights never replaces the run's own report
        write_json(out / ("eval.json" if args.eval_only else "report.json"), report)
        log.info(f"[finetune] val top-1 {report['val_top1']:.2f}%  top-5 {report['val_top5']:.2f}%  "
                 f"({report['val_num_images']} images, chance {report['chance_top1']:.1f}%)")
    return report


def parse_args(argv=None) -> argparse.Namespace:
    return recipes.record_explicit(get_args_parser(), argv).parse_args(argv)


def cli(argv=None) -> int:
    return run_command("finetune", recipes.record_explicit(get_args_parser(), argv), main, argv, interrupted=RESUMABLE)


if __name__ == "__main__":
    sys.exit(cli())
