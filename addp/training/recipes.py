"""Named settings of the paper's runs for `addp.train --recipe` and `addp.finetune --recipe`.

Each recipe maps command-line option names (argparse `dest`s) to values read off the official
release scripts of ChangyaoTian/ADDP at 7c2c034 (`configs/release/*/*.sh`, plus the argument
defaults of `main_pretrain.py` / `main_finetune.py` the scripts leave unchanged) or, where no
script was released, off the paper. A recipe fills in every option the command line does not
set itself: explicit flags win.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from ..errors import AddpError

_SCRIPTS = "ChangyaoTian/ADDP@7c2c034 configs/release"


@dataclass(frozen=True)
class Recipe:
    name: str
    command: str  # "train" or "finetune"
    source: str
    settings: dict = field(default_factory=dict)


def _pretrain(model: str, predictor: str, epochs: int) -> dict:
    # pretrain_addp_{base_1600,large_800}ep.sh; main_pretrain.py defaults: beta2 0.95, min_lr 0,
    # drop_out_rate 0.1 (the model preset's dropout), crop scale (0.2, 1) + flip, decoder depth 8
    return {"model": model, "predictor_model": predictor, "epochs": epochs, "warmup_epochs": 40,
            "global_batch": 4096, "blr": 1e-4, "weight_decay": 0.05, "clip_grad": 3.0, "min_lr": 0.0,
            "beta1": 0.9, "beta2": 0.95, "crop_min": 0.2, "no_flip": False,
            # the official run puts its frozen MAGE predictor in train mode (dropout 0.1 active)
            "predictor_dropout": 0.1}


def _finetune(epochs: int, blr: float, layer_decay: float, drop_path: float, warmup: int) -> dict:
    # finetune_addp_{base_100,large_50}ep.sh; main_finetune.py defaults: min_lr 1e-6, beta2
    # 0.999, smoothing 0.1, aa rand-m9-mstd0.5-inc1, no clipping, avg pool, eval every epoch
    return {"epochs": epochs, "warmup_epochs": warmup, "global_batch": 1024, "input_size": 256, "blr": blr,
            "layer_decay": layer_decay, "weight_decay": 0.05, "drop_path": drop_path, "reprob": 0.25,
            "mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1, "aa": "rand-m9-mstd0.5-inc1", "min_lr": 1e-6,
            "beta1": 0.9, "beta2": 0.999, "clip_grad": None, "global_pool": "avg", "eval_every_epochs": 1.0,
            "official_layout": True}


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("addp_vit_base_1600ep", "train", f"{_SCRIPTS}/base/pretrain_addp_base_1600ep.sh",
           _pretrain("addp_vit_base_patch16", "mage_vit_base_patch16", 1600)),
    Recipe("addp_vit_large_800ep", "train", f"{_SCRIPTS}/large/pretrain_addp_large_800ep.sh",
           _pretrain("addp_vit_large_patch16", "mage_vit_large_patch16", 800)),
    Recipe("addp_resnet50", "train",
           "paper App. C.2 (AdamW beta2 0.98); the other settings are those of the ViT-B script",
           {**_pretrain("addp_resnet50", "mage_vit_base_patch16", 1600), "beta2": 0.98}),
    Recipe("finetune_vit_base_100ep", "finetune", f"{_SCRIPTS}/base/finetune_addp_base_100ep.sh",
           _finetune(100, 1e-3, 0.65, 0.1, 20)),
    Recipe("finetune_vit_large_50ep", "finetune", f"{_SCRIPTS}/large/finetune_addp_large_50ep.sh",
           _finetune(50, 2.5e-4, 0.8, 0.2, 5)),
    # paper Tab. 16 (MAE's protocol): LARS, crop + flip only, BatchNorm + linear head on the class token
    Recipe("linear_probe_vit", "finetune", "paper Tab. 16 (linear probing)",
           {"linear_probe": True, "epochs": 90, "warmup_epochs": 10, "global_batch": 16384, "blr": 0.1,
            "weight_decay": 0.0, "min_lr": 0.0, "probe_optimizer": "lars", "aa": "", "reprob": 0.0,
            "mixup": 0.0, "cutmix": 0.0, "smoothing": 0.0, "input_size": 256, "global_pool": "token",
            "eval_every_epochs": 1.0}),
)}


OFFICIAL_FINETUNE_RECIPES = {"base": "finetune_vit_base_100ep", "large": "finetune_vit_large_50ep"}


def official_finetune(size: str | None) -> dict:
    """The official fine-tuning layer decay, blr and warm-up of a ViT size ("base" / "large"); {} for others."""
    if size not in OFFICIAL_FINETUNE_RECIPES:
        return {}
    settings = RECIPES[OFFICIAL_FINETUNE_RECIPES[size]].settings
    return {k: float(settings[k]) if k == "warmup_epochs" else settings[k] for k in ("layer_decay", "blr", "warmup_epochs")}


def names(command: str) -> list[str]:
    return sorted(n for n, r in RECIPES.items() if r.command == command)


def record_explicit(parser, argv: list[str] | None):
    """`parser`, made to record in `args.explicit` the options given on the command line
    (a recipe leaves them as they are), before its other checks run."""
    parser.checks.insert(0, lambda args: setattr(args, "explicit", explicit_dests(parser, argv)))
    return parser


def explicit_dests(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The option `dest`s given on the command line (parsed again with every default None)."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=parser.allow_abbrev)
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            kwargs = {"dest": action.dest, "default": None}
            if action.nargs == 0:  # flags: store_true/false/const, --x/--no-x
                kwargs.update(action="store_const", const=True)
            elif isinstance(action, argparse._AppendAction):
                kwargs.update(action="append")
            else:
                kwargs.update(nargs=action.nargs)
            probe.add_argument(*action.option_strings, **kwargs)
    given, _ = probe.parse_known_args(sys.argv[1:] if argv is None else argv)
    return {k for k, v in vars(given).items() if v is not None}


# a length in epochs and its alternative in steps: an explicit one keeps the recipe's other out
_IN_STEPS = {"epochs": "steps", "warmup_epochs": "warmup_steps", "eval_every_epochs": "eval_every"}


def apply(args: argparse.Namespace, name: str, command: str, explicit: set[str]) -> dict:
    """Fill `args` with recipe `name`'s settings, except the options in `explicit` (and a
    length in epochs whose alternative in steps is explicit). Returns the settings filled in."""
    recipe = RECIPES.get(name)
    if recipe is None or recipe.command != command:
        raise AddpError(f"unknown --recipe {name!r} for addp.{command}; choose from {', '.join(names(command))}")
    filled = {}
    for key, value in recipe.settings.items():
        if not hasattr(args, key):
            raise AddpError(f"recipe {name} sets {key!r}, which addp.{command} has no option for")
        if key not in explicit and _IN_STEPS.get(key) not in explicit:
            setattr(args, key, value)
            filled[key] = value
    return filled


def describe(name: str, filled: dict, explicit: set[str]) -> str:
    """One line: the recipe, its source and the settings it filled in."""
    kept = sorted(set(RECIPES[name].settings) & explicit)
    text = ", ".join(f"{k}={v}" for k, v in filled.items())
    extra = f" (given on the command line: {', '.join(kept)})" if kept else ""
    return f"[recipe] {name} from {RECIPES[name].source}: {text}{extra}"


# -- schedules and batch split -----------------------------------------------------------------
def epochs_to_steps(epochs: float, num_samples: int, batch_size: int, world_size: int, accum_steps: int,
                    at_least: int = 1) -> int:
    """Optimizer steps in `epochs` passes over `num_samples` images. An epoch is the number of
    whole global micro-batches the data holds (the sampler's epoch, as a drop_last loader)."""
    micro_per_epoch = num_samples // (batch_size * world_size)
    if micro_per_epoch == 0:
        raise AddpError(f"{num_samples} images are fewer than one global batch of {batch_size * world_size}")
    return max(at_least, round(epochs * micro_per_epoch / accum_steps))


def describe_schedule(sched: dict) -> str:
    parts = [f"{sched['dataset_images']} images / global batch {sched['global_batch']}"]
    if "epochs" in sched:
        parts.append(f"{sched['epochs']:g} epochs = {sched['steps']} steps")
    if "warmup_epochs" in sched:
        parts.append(f"warm-up {sched['warmup_epochs']:g} epochs = {sched['warmup_steps']} steps")
    if "eval_every_epochs" in sched:
        parts.append(f"evaluation every {sched['eval_every_epochs']:g} epochs = {sched['eval_every']} steps")
    return "[schedule] " + ", ".join(parts)


def split_global_batch(args, world_size: int, explicit: set[str]) -> str | None:
    """Set --batch-size (or --accum-steps, when --batch-size was given) from --global-batch.
    Returns a line to print, or None when there is no global batch to meet."""
    total = getattr(args, "global_batch", None)
    if not total:
        return None
    if {"batch_size", "accum_steps"} <= explicit:
        got = args.batch_size * args.accum_steps * world_size
        if "global_batch" in explicit and got != total:
            raise AddpError(f"--global-batch {total} but --batch-size {args.batch_size} x --accum-steps "
                            f"{args.accum_steps} x {world_size} processes = {got}")
        args.global_batch = got
        return None
    if "batch_size" in explicit:
        per_step = args.batch_size * world_size
        if total % per_step:
            raise AddpError(f"global batch {total} is not a multiple of --batch-size {args.batch_size} x "
                            f"{world_size} processes")
        args.accum_steps = total // per_step
    else:
        per_process = args.accum_steps * world_size
        if total % per_process:
            raise AddpError(f"global batch {total} does not split over {world_size} processes x "
                            f"{args.accum_steps} accumulation steps")
        args.batch_size = total // per_process
    return (f"[batch] global batch {total} = {args.batch_size} per process x {args.accum_steps} "
            f"accumulation steps x {world_size} processes")
