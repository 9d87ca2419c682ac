"""`python -m addp.train`: ADDP pretraining, from one CPU to many GPUs (torchrun).

With no arguments it trains a complete small ADDP on the bundled handwritten digits:
a VQ tokenizer, then a MAGE token predictor, then the ADDP network, each stage cached in
the output folder (reused only when it was made exactly as this command would make it, see
docs/run-folders.md), and ends with a grid of samples.
With `--data-path /imagenet/train --model addp_vit_large_patch16 --tokenizer
vqgan_jax_strongaug.ckpt --predictor mage-vitl-1600.pth` the same code runs the paper's
pretraining (launch it with torchrun for several GPUs).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from . import ops
from .training import recipes
from .models import registry
from .models.checkpoint import load_checkpoint
from .cli import (RESUMABLE, ArgumentParser, add_runtime_args, add_sampler_args, existing_file, fraction, integer,
                  non_negative_float, non_negative_int, number, output_folder, positive_float, positive_int,
                  run_command)
from .training.diffusion import CONDITIONS, MAPPINGS, MASKINGS, DiffusionConfig
from .runtime.distributed import init_distributed
from .runtime.tuning import tune_for_device
from .errors import AddpError
from .runs.files import atomic_write, write_json
from .training.loss import TARGETS
from .models.addp import TOKEN_INPUTS, check_tokenizer_fits
from .runs.lock import lock_run_folder
from .sampling import SamplerConfig
from .training.stages import ADDPStage, masked_token_accuracy, reconstruction_psnr
from .training.run_stages import (STAGES, build_dataset, heldout_images, predictor_for, refuse_or_retrain, train_config,
                                  run_stage, save_stage_output, schedule, stage_identity, tokenizer_for)


log = logging.getLogger("addp.train")  # a fixed name: run as `python -m`, __name__ is "__main__"


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser("train", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=None, choices=recipes.names("train"),
                   help="the settings of an official pretraining run (explicit flags still win)")
    p.add_argument("--stage", default="all", choices=("all",) + STAGES, help="which stage(s) to run")
    p.add_argument("--model", default="addp_vit_small", choices=registry.list_models("addp"))
    p.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the model config, e.g. drop_path=0.1 (repeatable)")
    p.add_argument("--tokenizer", type=existing_file,
                   help="an existing tokenizer checkpoint (ours or vqgan_jax_strongaug.ckpt)")
    p.add_argument("--predictor", type=existing_file,
                   help="an existing token predictor checkpoint (ours or mage-vit*-1600.pth)")
    p.add_argument("--tokenizer-model", default=None, choices=registry.list_models("tokenizer"),
                   help="preset to train when no --tokenizer is given (default: matches --model)")
    p.add_argument("--predictor-model", default=None, choices=registry.list_models("predictor"))
    p.add_argument("--data-path", help="ImageFolder root, or a root holding train/ (then train/ only, e.g. "
                                       "imagenet/); default: bundled digits")
    p.add_argument("--crop-min", type=number(0, 1, low_open=True), default=0.2,
                   help="RandomResizedCrop scale lower bound")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips")
    p.add_argument("--output-dir", type=output_folder, default="output/addp_demo")
    p.add_argument("--steps", type=positive_int, default=6000, help="ADDP training steps")
    p.add_argument("--epochs", type=positive_float, default=None,
                   help="ADDP training length in epochs of the data (replaces --steps)")
    p.add_argument("--tokenizer-steps", type=positive_int, default=500)
    p.add_argument("--predictor-steps", type=positive_int, default=2400)
    p.add_argument("--batch-size", type=positive_int, default=32, help="per process and micro-step")
    p.add_argument("--accum-steps", type=positive_int, default=1)
    p.add_argument("--global-batch", type=positive_int, default=None,
                   help="images per optimizer step over all processes; sets --batch-size (or, when "
                        "--batch-size is given, --accum-steps) from the world size")
    p.add_argument("--blr", type=positive_float, default=None,
                   help="base lr; lr = blr * global batch / 256 (default 1e-4 as the official runs, "
                        "4e-3 for the small presets)")
    p.add_argument("--lr", type=positive_float, default=None, help="absolute ADDP lr (overrides --blr)")
    p.add_argument("--tokenizer-lr", type=positive_float, default=2e-3)
    p.add_argument("--predictor-lr", type=positive_float, default=3e-3)
    p.add_argument("--min-lr", type=non_negative_float, default=0.0)
    p.add_argument("--warmup-steps", type=non_negative_int, default=None,
                   help="ADDP warm-up, shorter than --steps (the tokenizer and predictor stages warm up for at most "
                        "their length minus one step); default: 100 for the small presets, else 40 epochs (the "
                        "official runs)")
    p.add_argument("--warmup-epochs", type=non_negative_float, default=None,
                   help="warm-up in epochs (replaces --warmup-steps)")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.05)
    p.add_argument("--clip-grad", type=non_negative_float, default=3.0, help="gradient norm clip (0: off)")
    p.add_argument("--beta1", type=fraction, default=0.9, help="AdamW beta1")
    p.add_argument("--beta2", type=fraction, default=0.95, help="AdamW beta2 (the paper's ResNet-50: 0.98)")
    add_runtime_args(p, compile="the training step")
    p.add_argument("--ema-decay", type=fraction, default=0.0, help="EMA of the weights (0: off)")
    p.add_argument("--mapping", default="weighted_sum", choices=MAPPINGS)
    p.add_argument("--condition", default="next", choices=CONDITIONS,
                   help="predictor condition of the inputs: reliable tokens of t+1 (paper) or of t")
    p.add_argument("--masking", default="default", choices=MASKINGS)
    p.add_argument("--target", default="soft", choices=TARGETS)
    p.add_argument("--token-input", default=None, choices=TOKEN_INPUTS,
                   help="where reliable tokens enter the network (encoder_decoder: paper Tab. 5); "
                        "default: the preset's (decoder)")
    p.add_argument("--predictor-dropout", type=fraction, default=0.0,
                   help="dropout rate of the frozen token predictor in both of its passes, as in the "
                        "official run (0.1, MAGE's); 0: the predictor runs in eval mode")
    p.add_argument("--log-every", type=positive_int, default=20)
    p.add_argument("--ckpt-every", type=positive_int, default=500)
    p.add_argument("--num-workers", type=integer(0, 256), default=None,
                   help="default: 0 for digits, min(8, CPU cores) for folders")
    p.add_argument("--resume", type=existing_file, default=None, help="a training checkpoint.pt to continue from")
    p.add_argument("--force", action="store_true", help="start over in an output folder of another run")
    p.add_argument("--num-samples", type=non_negative_int, default=64, help="samples in the final grid (0: none)")
    add_sampler_args(p, prefix="sample-", defaults=SamplerConfig(temperature=1.0))
    p.add_check(_check_configs)
    return p


def _check_configs(args) -> None:
    """Build every config the run will use, so a bad value fails before any training."""
    overrides = parse_options(args.model_option)
    if args.token_input:
        overrides["token_input"] = args.token_input
    args.model_overrides = overrides
    _check_used(args)
    try:
        args.net_config = registry.preset_config(args.model, **overrides)
    except AddpError as e:
        raise AddpError(f"--model-option: {e}") from None
    provisional = {"steps": args.steps, "warmup_steps": args.warmup_steps or 0}  # epochs need the data
    for stage in STAGES:
        train_config(args, stage, provisional)


# Options that only shape a stage this command trains: ignored, they would be silently wrong.
_TRAINS = {"tokenizer": ("tokenizer_steps", "tokenizer_lr", "tokenizer_model"),
           "predictor": ("predictor_steps", "predictor_lr", "predictor_model")}


def _check_used(args) -> None:
    """Refuse options this command would ignore (as given on the command line)."""
    explicit = getattr(args, "explicit", set())
    if args.resume and args.stage == "all":
        raise AddpError("--resume continues one stage: give --stage tokenizer, predictor or addp with it")
    for stage, options in _TRAINS.items():
        ignored = [o for o in options if o in explicit]
        if ignored and getattr(args, stage):
            flag = "--" + ignored[0].replace("_", "-")
            raise AddpError(f"{flag} trains a {stage}, but --{stage} gives one; drop {flag}")
    if "codebook_size" in args.model_overrides:
        raise AddpError("--model-option codebook_size: the network's codebook is the tokenizer's; "
                        "choose it with --tokenizer-model or --tokenizer")
    if "warmup_steps" in explicit and args.epochs is None and args.warmup_steps >= args.steps:
        raise AddpError(f"--warmup-steps {args.warmup_steps} must be shorter than --steps {args.steps}")


# -- building blocks -----------------------------------------------------------------------
def parse_options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise AddpError(f"--model-option expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def family_presets(model: str) -> tuple[str, str]:
    return ("vqgan_small", "mage_vit_small") if model.endswith("_small") else ("vqgan_mage", "mage_vit_base_patch16")


# -- main ----------------------------------------------------------------------------------
def resolve_recipe(args, dist) -> None:
    """Fill in --recipe's settings (not the explicit flags) and the batch split; says so once."""
    explicit = getattr(args, "explicit", set())
    args.recipe_record = None
    if args.recipe:
        filled = recipes.apply(args, args.recipe, "train", explicit)
        args.recipe_record = {"name": args.recipe, "source": recipes.RECIPES[args.recipe].source, "filled": filled}
        log.info(recipes.describe(args.recipe, filled, explicit))
    line = recipes.split_global_batch(args, dist.world_size, explicit)
    if line:
        log.info(line)
    _check_configs(args)  # the recipe may name another model or values


def main(args) -> dict:
    dist = init_distributed(args.device)
    tune_for_device(dist.device)
    torch.manual_seed(args.seed)
    resolve_recipe(args, dist)
    out = Path(args.output_dir)
    lock = lock_run_folder(out, dist.is_main, [out / s for s in STAGES])
    try:
        return _train(args, dist, out)
    finally:
        if lock is not None:
            lock.release()


def _train(args, dist, out: Path) -> dict:
    overrides, net_config = args.model_overrides, args.net_config
    tok_preset, pred_preset = family_presets(args.model)
    dataset = build_dataset(args, net_config.image_size)
    args.schedule = schedule(args, len(dataset), dist.world_size)
    if "epochs" in args.schedule or "warmup_epochs" in args.schedule:
        log.info(recipes.describe_schedule(args.schedule))
    diffusion = DiffusionConfig(mapping=args.mapping, condition=args.condition, masking=args.masking,
                                predictor_dropout=args.predictor_dropout)
    runs = STAGES if args.stage == "all" else (args.stage,)  # the stages this command trains
    report: dict = {"output_dir": str(out), "ops_backends": ops.backends(dist.device)}
    started = time.perf_counter()

    given_predictor = load_checkpoint(args.predictor, component="predictor") if args.predictor else None
    tokenizer, tok_sha = tokenizer_for(args, dist, dataset, net_config, tok_preset, runs)
    check_tokenizer_fits(registry.preset_config(args.model, codebook_size=tokenizer.config.codebook_size,
                                                **overrides), tokenizer.config)
    tokenizer = tokenizer.to(dist.device).eval()
    if "tokenizer" in runs:
        report["tokenizer_psnr_db"] = round(reconstruction_psnr(tokenizer, heldout_images(args, net_config)), 2)
        log.info(f"[tokenizer] held-out reconstruction PSNR {report['tokenizer_psnr_db']:.2f} dB")
    if args.stage == "tokenizer":
        return _finish(dist, report, started)

    predictor, pred_sha = predictor_for(args, dist, dataset, tokenizer, tok_sha, diffusion, pred_preset, runs,
                                        given_predictor)
    if predictor.config.codebook_size != tokenizer.config.codebook_size:
        raise AddpError(f"the tokenizer's codebook has {tokenizer.config.codebook_size} entries but the token "
                        f"predictor predicts {predictor.config.codebook_size}: they were not trained together")
    predictor = predictor.to(dist.device).eval()
    if "predictor" in runs:
        acc, chance = masked_token_accuracy(predictor, tokenizer, heldout_images(args, net_config))
        report.update(predictor_accuracy_50=round(acc, 4), predictor_chance=round(chance, 4))
        log.info(f"[predictor] held-out masked-token accuracy at 50% masking {acc:.1%} (chance {chance:.1%})")
    if args.stage == "predictor":
        return _finish(dist, report, started)

    net_file = out / "addp.safetensors"
    net = registry.build_model(registry.preset_config(args.model, codebook_size=tokenizer.config.codebook_size,
                                                      **overrides))
    identity = stage_identity(args, "addp", net.config, {"tokenizer_sha256": tok_sha, "predictor_sha256": pred_sha,
                                                         "diffusion": diffusion.__dict__, "target": args.target}, dist)
    refuse_or_retrain(args, "addp", net_file, identity, dist)
    result = run_stage(ADDPStage(net, tokenizer, predictor, diffusion, args.target), args, dist, dataset, identity)
    net = result["model"].eval()
    save_stage_output(dist, net_file, {"addp": net, "tokenizer": tokenizer}, "addp", identity)
    losses = result["losses"]
    report.update(addp_loss_first100=round(sum(losses[:100]) / len(losses[:100]), 4),
                  addp_loss_final100=round(sum(losses[-100:]) / len(losses[-100:]), 4))
    log.info(f"[addp] loss: first 100 steps {report['addp_loss_first100']:.4f} -> "
             f"last 100 steps {report['addp_loss_final100']:.4f}")
    if args.num_samples and dist.is_main:
        report["samples"] = str(write_samples(net, tokenizer, args.num_samples, out / "samples.png", args.seed,
                                              args.sampler_config))
    report["addp_checkpoint"] = str(net_file)
    return _finish(dist, report, started)


def write_samples(net, tokenizer, n: int, path: Path, seed: int, config: SamplerConfig) -> Path:
    from torchvision.utils import save_image

    from .sampling import generate
    images = generate(net.to("cpu"), tokenizer.to("cpu"), n, config, generator=torch.Generator().manual_seed(seed))
    return atomic_write(path, lambda tmp: save_image(images, tmp, nrow=int(n ** 0.5), format="png"))


def _finish(dist, report: dict, started: float) -> dict:
    report["wall_time_s"] = round(time.perf_counter() - started, 1)
    if dist.is_main:
        write_json(Path(report["output_dir"]) / "report.json", report)
    return report


def parse_args(argv=None) -> argparse.Namespace:
    return recipes.record_explicit(get_args_parser(), argv).parse_args(argv)


def cli(argv=None) -> int:
    return run_command("train", recipes.record_explicit(get_args_parser(), argv), main, argv, interrupted=RESUMABLE)


if __name__ == "__main__":
    sys.exit(cli())
