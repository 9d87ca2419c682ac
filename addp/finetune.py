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

from .training import recipes
from .models import registry
from .models.checkpoint import save_checkpoint
from .models.classifier import GLOBAL_POOLS
from .cli import (RESUMABLE, ArgumentParser, fraction, non_negative_float, non_negative_int, positive_int, probability,
                  run_command)
from .errors import AddpError, first_line
from .runs.files import write_json
from .training.finetune_data import build_datasets
from .training.finetune_engine import (Run, add_training_args, run_identity, schedule, start_run, train_config,
                                       train_or_evaluate)
from .training.finetuning import PROBE_OPTIMIZERS, ClassifierStage, build_classifier_for, evaluate, resolve_defaults
from .training.trainer import Trainer


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
    add_training_args(
        p, "finetune", steps=600, blr=None, layer_decay=None, batch_size=64, min_lr=1e-6, weight_decay=None,
        drop_path=None, log_every=50, num_workers=None, compile="the training step", helps={
            "recipe": "the settings of an official fine-tune or of the paper's linear probe (explicit flags win)",
            "finetune": "checkpoint to start from: ours (ADDP or classifier) or addp-vit-*-16.pth",
            "data_path": "folder with train/ and val/ ImageFolder trees; default: bundled digits",
            "warmup_steps": "default: 20 epochs for ViT-B, 5 for ViT-L (the official runs), else 5%% of the steps",
            "blr": "lr = blr * global batch / 256; default 1e-3 for ViT-B, 2.5e-4 for ViT-L (official), else 5e-4; "
                   "probe 0.1 (MAE); on digits 1e-2, probe 25 (LARS needs MAE's absolute lr, ~6.4, at small batches)",
            "layer_decay": "layer-wise lr decay (1: off); default 0.65 for ViT-B, 0.8 for ViT-L (official), else 0.75",
            "weight_decay": "default 0.05 (probe 0)",
            "drop_path": "default 0.2 for ViT-L, else 0.1",
            "num_workers": "default: 0 for digits, min(8, CPU cores) for folders"})
    p.add_argument("--official-layout", action="store_true",
                   help="load the encoder as the official fine-tune does: no tokenizer_norm, fc_norm fresh")
    p.add_argument("--model", default=None, choices=registry.list_models("classifier"),
                   help="classifier preset when no --finetune is given (random init); default vit_small_cls")
    p.add_argument("--linear-probe", action="store_true", help="frozen encoder, BatchNorm + linear head")
    p.add_argument("--labels-per-class", type=positive_int, default=None, help="train on N labelled images per class")
    p.add_argument("--input-size", type=positive_int, default=None, help="default: the encoder's pretraining size")
    p.add_argument("--global-pool", default=None, choices=GLOBAL_POOLS, help="default: avg (token for a probe)")
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
    return p


def main(args) -> dict:
    with start_run(args, "finetune") as run:
        return _finetune(args, run)


def _finetune(args, run: Run) -> dict:
    dist, out = run.dist, run.out
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
    cfg = train_config(args, sched, blr=args.blr, weight_decay=args.weight_decay)
    identity = run_identity(cfg, model.config, start=args.finetune, sched=sched, recipe=run.recipe,
                            world_size=dist.world_size, settings={
                                "linear_probe": args.linear_probe, "layer_decay": args.layer_decay,
                                "mixup": mixup, "cutmix": cutmix, "smoothing": args.smoothing,
                                "probe_optimizer": args.probe_optimizer, "data": args.data_path or "digits",
                                "labels_per_class": args.labels_per_class, "shift": args.shift, "aa": args.aa,
                                "reprob": args.reprob, "official_layout": args.official_layout})
    trainer = Trainer(stage, cfg, out, dist, identity)
    report = {"output_dir": str(out), "model": model.config.name, "finetune": args.finetune,
              "mode": "linear_probe" if args.linear_probe else "finetune", "num_classes": num_classes,
              "train_images": len(train_set), "val_images": len(val_set)}
    metrics, best = train_or_evaluate(
        trainer, train_set, lambda m: evaluate(m, val_set, dist, num_workers=cfg.num_workers), key="top1",
        eval_every=sched["eval_every"], resume=args.resume, force=args.force, eval_only=args.eval_only,
        log_prefix="val_")
    if not args.eval_only:
        report["steps"] = cfg.steps
    if best:
        report.update({f"best_{k}": v for k, v in best.items()})
        report["checkpoint_best"] = str(out / "checkpoint-best.safetensors")
    final = trainer.final_model()
    report.update({f"val_{k}": v for k, v in metrics.items()})
    report["chance_top1"] = 100.0 / num_classes
    if dist.is_main and not args.eval_only:
        report["classifier"] = str(save_checkpoint(out / "classifier.safetensors", final.cpu()))
    report["wall_time_s"] = round(time.perf_counter() - run.started, 1)
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
