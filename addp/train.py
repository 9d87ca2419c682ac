"""`python -m addp.train`: ADDP pretraining, from one CPU to many GPUs (torchrun).

With no arguments it trains a complete small ADDP on the bundled handwritten digits:
a VQ tokenizer, then a MAGE token predictor, then the ADDP network, each stage cached in
the output folder (skipped when its file exists), and ends with a grid of samples.
With `--data-path /imagenet/train --model addp_vit_large_patch16 --tokenizer
vqgan_jax_strongaug.ckpt --predictor mage-vitl-1600.pth` the same code runs the paper's
pretraining (launch it with torchrun for several GPUs).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import ops, recipes, registry
from .checkpoint import atomic_write, load_checkpoint, save_checkpoint
from .diffusion import CONDITIONS, MAPPINGS, MASKINGS, DiffusionConfig
from .distributed import init_distributed
from .loss import TARGETS
from .model import TOKEN_INPUTS
from .cli import run
from .data import default_workers
from .registry import AddpError
from .stages import ADDPStage, PredictorStage, TokenizerStage, masked_token_accuracy, reconstruction_psnr
from .trainer import PRECISIONS, TrainConfig, Trainer, identity_of

STAGES = ("tokenizer", "predictor", "addp")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m addp.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", default=None, choices=recipes.names("train"),
                   help="the settings of an official pretraining run (explicit flags still win)")
    p.add_argument("--stage", default="all", choices=("all",) + STAGES, help="which stage(s) to run")
    p.add_argument("--model", default="addp_vit_small", choices=registry.list_models("addp"))
    p.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the model config, e.g. drop_path=0.1 (repeatable)")
    p.add_argument("--tokenizer", help="an existing tokenizer checkpoint (ours or vqgan_jax_strongaug.ckpt)")
    p.add_argument("--predictor", help="an existing token predictor checkpoint (ours or mage-vit*-1600.pth)")
    p.add_argument("--tokenizer-model", default=None, choices=registry.list_models("tokenizer"),
                   help="preset to train when no --tokenizer is given (default: matches --model)")
    p.add_argument("--predictor-model", default=None, choices=registry.list_models("predictor"))
    p.add_argument("--data-path", help="ImageFolder root, or a root holding train/ (then train/ only, e.g. "
                                       "imagenet/); default: bundled digits")
    p.add_argument("--crop-min", type=float, default=0.2, help="RandomResizedCrop scale lower bound")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips")
    p.add_argument("--output-dir", default="output/addp_demo")
    p.add_argument("--steps", type=int, default=6000, help="ADDP training steps")
    p.add_argument("--epochs", type=float, default=None,
                   help="ADDP training length in epochs of the data (replaces --steps)")
    p.add_argument("--tokenizer-steps", type=int, default=500)
    p.add_argument("--predictor-steps", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=32, help="per process and micro-step")
    p.add_argument("--accum-steps", type=int, default=1)
    p.add_argument("--global-batch", type=int, default=None,
                   help="images per optimizer step over all processes; sets --batch-size (or, when "
                        "--batch-size is given, --accum-steps) from the world size")
    p.add_argument("--blr", type=float, default=None,
                   help="base lr; lr = blr * global batch / 256 (default 1e-4 as the official runs, "
                        "4e-3 for the small presets)")
    p.add_argument("--lr", type=float, default=None, help="absolute ADDP lr (overrides --blr)")
    p.add_argument("--tokenizer-lr", type=float, default=2e-3)
    p.add_argument("--predictor-lr", type=float, default=3e-3)
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="default: 100 for the small presets, else 40 epochs (the official runs)")
    p.add_argument("--warmup-epochs", type=float, default=None, help="warm-up in epochs (replaces --warmup-steps)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip-grad", type=float, default=3.0)
    p.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2 (the paper's ResNet-50: 0.98)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the weights (0: off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--mapping", default="weighted_sum", choices=MAPPINGS)
    p.add_argument("--condition", default="next", choices=CONDITIONS,
                   help="predictor condition of the inputs: reliable tokens of t+1 (paper) or of t")
    p.add_argument("--masking", default="default", choices=MASKINGS)
    p.add_argument("--target", default="soft", choices=TARGETS)
    p.add_argument("--token-input", default=None, choices=TOKEN_INPUTS,
                   help="where reliable tokens enter the network (encoder_decoder: paper Tab. 5); "
                        "default: the preset's (decoder)")
    p.add_argument("--predictor-dropout", type=float, default=0.0,
                   help="dropout rate of the frozen token predictor in both of its passes, as in the "
                        "official run (0.1, MAGE's); 0: the predictor runs in eval mode")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=None, help="default: 0 for digits, min(8, CPU cores) for folders")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--resume", default=None, help="a training checkpoint.pt to continue from")
    p.add_argument("--force", action="store_true", help="start over in an output folder of another run")
    p.add_argument("--num-samples", type=int, default=64, help="samples in the final grid (0: none)")
    p.add_argument("--sample-temperature", type=float, default=1.0,
                   help="Gumbel choice temperature of the final grid (the paper's ImageNet setting: 6.0)")
    return p


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


def build_dataset(args, image_size: int, dist):
    from .data import DigitsDataset, ImageFolderDataset, training_folder
    if args.data_path:
        folder, line = training_folder(args.data_path)
        if line:
            _say(dist, line)
        return ImageFolderDataset(folder, image_size, args.crop_min, not args.no_flip, seed=args.seed)
    return DigitsDataset("train", image_size, flip=False, seed=args.seed)


def schedule(args, num_samples: int, world_size: int) -> dict:
    """ADDP steps and warm-up steps, from epochs where they are given in epochs."""
    global_batch = args.batch_size * args.accum_steps * world_size
    out = {"global_batch": global_batch, "dataset_images": num_samples}
    steps = args.steps
    if args.epochs is not None:
        steps = recipes.epochs_to_steps(args.epochs, num_samples, args.batch_size, world_size, args.accum_steps)
        out["epochs"] = args.epochs
    if args.warmup_epochs is not None:
        warmup = recipes.epochs_to_steps(args.warmup_epochs, num_samples, args.batch_size, world_size,
                                         args.accum_steps, at_least=0)
        out["warmup_epochs"] = args.warmup_epochs
    elif args.warmup_steps is not None:
        warmup = args.warmup_steps
    elif args.model.endswith("_small"):
        warmup = 100
    else:  # the official runs warm up for 40 epochs
        warmup = recipes.epochs_to_steps(40, num_samples, args.batch_size, world_size, args.accum_steps, at_least=0)
        out["warmup_epochs"] = 40
    out.update(steps=steps, warmup_steps=min(warmup, steps - 1))
    return out


def train_config(args, stage: str, sched: dict) -> TrainConfig:
    steps = {"tokenizer": args.tokenizer_steps, "predictor": args.predictor_steps, "addp": sched["steps"]}[stage]
    lr = {"tokenizer": args.tokenizer_lr, "predictor": args.predictor_lr, "addp": args.lr}[stage]
    blr = args.blr if args.blr is not None else (4e-3 if args.model.endswith("_small") else 1e-4)
    return TrainConfig(steps=steps, batch_size=args.batch_size, accum_steps=args.accum_steps, blr=blr, lr=lr,
                       min_lr=args.min_lr, warmup_steps=min(sched["warmup_steps"], steps - 1),
                       weight_decay=0.0 if stage == "tokenizer" else args.weight_decay,
                       betas=(args.beta1, args.beta2),
                       clip_grad=args.clip_grad, precision=args.precision, ema_decay=args.ema_decay,
                       compile=args.compile, log_every=args.log_every, ckpt_every=args.ckpt_every, seed=args.seed,
                       num_workers=args.num_workers if args.num_workers is not None
                       else (default_workers() if args.data_path else 0))


def run_stage(stage, args, dist, dataset, extra_identity: dict) -> dict:
    """Train one stage in output/<stage>/ (resuming if a matching checkpoint is there)."""
    from .data import make_loader
    cfg = train_config(args, stage.name, args.schedule)
    out = Path(args.output_dir) / stage.name
    run = {"recipe": args.recipe_record} if args.recipe_record else {}
    if stage.name == "addp":
        run["schedule"] = args.schedule
    identity = identity_of(cfg, stage.model.config, extra_identity, run,
                           {"data": args.data_path or "digits", "world_size": dist.world_size})
    trainer = Trainer(stage, cfg, out, dist, identity)
    trainer.maybe_resume(args.resume if args.stage == stage.name else None, args.force)
    if trainer.step and dist.is_main:
        print(f"[{stage.name}] resuming at step {trainer.step} from {trainer.checkpoint_path}")
    result = trainer.fit(lambda start: make_loader(dataset, cfg.batch_size, cfg.seed, dist.rank,
                                                   dist.world_size, start, cfg.num_workers))
    result["model"] = trainer.final_model()
    return result


def load_or_none(path: str | None, component: str):
    return load_checkpoint(path, component=component) if path else None


# -- main ----------------------------------------------------------------------------------
def resolve_recipe(args, dist) -> None:
    """Fill in --recipe's settings (not the explicit flags) and the batch split; says so once."""
    explicit = getattr(args, "explicit", set())
    args.recipe_record = None
    if args.recipe:
        filled = recipes.apply(args, args.recipe, "train", explicit)
        args.recipe_record = {"name": args.recipe, "source": recipes.RECIPES[args.recipe].source, "filled": filled}
        _say(dist, recipes.describe(args.recipe, filled, explicit))
    line = recipes.split_global_batch(args, dist.world_size, explicit)
    if line:
        _say(dist, line)


def main(args) -> dict:
    dist = init_distributed(args.device)
    torch.manual_seed(args.seed)
    resolve_recipe(args, dist)
    out = Path(args.output_dir)
    overrides = parse_options(args.model_option)
    if args.token_input:
        overrides["token_input"] = args.token_input
    net_config = registry.preset_config(args.model, **overrides)
    tok_preset, pred_preset = family_presets(args.model)
    dataset = build_dataset(args, net_config.image_size, dist)
    args.schedule = schedule(args, len(dataset), dist.world_size)
    if "epochs" in args.schedule or "warmup_epochs" in args.schedule:
        _say(dist, recipes.describe_schedule(args.schedule))
    diffusion = DiffusionConfig(mapping=args.mapping, condition=args.condition, masking=args.masking,
                                predictor_dropout=args.predictor_dropout)
    run_all = args.stage == "all"
    report: dict = {"output_dir": str(out), "ops_backends": ops.backends(dist.device)}
    started = time.perf_counter()

    tok_file, pred_file, net_file = out / "tokenizer.safetensors", out / "predictor.safetensors", out / "addp.safetensors"
    tokenizer = load_or_none(args.tokenizer, "tokenizer")
    if tokenizer is None and tok_file.exists() and args.stage != "tokenizer":
        tokenizer = load_checkpoint(tok_file)
        _say(dist, f"[tokenizer] cached: {tok_file}")
    if tokenizer is None and (run_all or args.stage == "tokenizer"):
        tok = registry.create_model(args.tokenizer_model or tok_preset, image_size=net_config.image_size)
        tokenizer = run_stage(TokenizerStage(tok), args, dist, dataset, {})["model"]
        _save(dist, tok_file, tokenizer)
    if tokenizer is None:
        raise AddpError(f"no tokenizer: pass --tokenizer, or run --stage tokenizer first (looked for {tok_file})")
    tokenizer = tokenizer.to(dist.device).eval()
    if run_all or args.stage == "tokenizer":
        report["tokenizer_psnr_db"] = round(reconstruction_psnr(tokenizer, heldout_images(args, net_config)), 2)
        _say(dist, f"[tokenizer] held-out reconstruction PSNR {report['tokenizer_psnr_db']:.2f} dB")
    if args.stage == "tokenizer":
        return _finish(dist, report, started)

    predictor = load_or_none(args.predictor, "predictor")
    if predictor is None and pred_file.exists() and args.stage != "predictor":
        predictor = load_checkpoint(pred_file)
        _say(dist, f"[predictor] cached: {pred_file}")
    if predictor is None and (run_all or args.stage == "predictor"):
        pred = registry.create_model(args.predictor_model or pred_preset,
                                     codebook_size=tokenizer.config.codebook_size)
        predictor = run_stage(PredictorStage(pred, tokenizer, diffusion), args, dist, dataset,
                              {"tokenizer": tokenizer.config.name})["model"]
        _save(dist, pred_file, predictor)
    if predictor is None:
        raise AddpError(f"no token predictor: pass --predictor, or run --stage predictor first (looked for {pred_file})")
    if predictor.config.codebook_size != tokenizer.config.codebook_size:
        raise AddpError(f"the tokenizer's codebook has {tokenizer.config.codebook_size} entries but the token "
                        f"predictor predicts {predictor.config.codebook_size}: they were not trained together")
    predictor = predictor.to(dist.device).eval()
    if run_all or args.stage == "predictor":
        acc, chance = masked_token_accuracy(predictor, tokenizer, heldout_images(args, net_config))
        report.update(predictor_accuracy_50=round(acc, 4), predictor_chance=round(chance, 4))
        _say(dist, f"[predictor] held-out masked-token accuracy at 50% masking {acc:.1%} (chance {chance:.1%})")
    if args.stage == "predictor":
        return _finish(dist, report, started)

    net = registry.build_model(registry.preset_config(args.model, codebook_size=tokenizer.config.codebook_size,
                                                      **overrides))
    result = run_stage(ADDPStage(net, tokenizer, predictor, diffusion, args.target), args, dist, dataset,
                       {"tokenizer": tokenizer.config.name, "predictor": predictor.config.name,
                        "diffusion": diffusion.__dict__, "target": args.target})
    net = result["model"].eval()
    _save(dist, net_file, {"addp": net, "tokenizer": tokenizer})
    losses = result["losses"]
    report.update(addp_loss_first100=round(sum(losses[:100]) / len(losses[:100]), 4),
                  addp_loss_final100=round(sum(losses[-100:]) / len(losses[-100:]), 4))
    _say(dist, f"[addp] loss: first 100 steps {report['addp_loss_first100']:.4f} -> "
               f"last 100 steps {report['addp_loss_final100']:.4f}")
    if args.num_samples and dist.is_main:
        report["samples"] = str(write_samples(net, tokenizer, args.num_samples, out / "samples.png", args.seed,
                                              args.sample_temperature))
    report["addp_checkpoint"] = str(net_file)
    return _finish(dist, report, started)


def heldout_images(args, net_config) -> torch.Tensor:
    from .data import ImageFolderDataset, load_digits
    if not args.data_path:
        return load_digits("heldout", net_config.image_size)[0]
    root = Path(args.data_path)
    val = ImageFolderDataset(root / "val" if (root / "val").is_dir() else root, net_config.image_size, train=False)
    pick = torch.randperm(len(val), generator=torch.Generator().manual_seed(0))[:512]
    return torch.stack([val[int(i)][0] for i in pick])


def write_samples(net, tokenizer, n: int, path: Path, seed: int, temperature: float) -> Path:
    from torchvision.utils import save_image

    from .sampler import SamplerConfig, generate
    images = generate(net.to("cpu"), tokenizer.to("cpu"), n, SamplerConfig(temperature=temperature),
                      generator=torch.Generator().manual_seed(seed))
    return atomic_write(path, lambda tmp: save_image(images, tmp, nrow=int(n ** 0.5), format="png"))


def _save(dist, path: Path, models) -> None:
    if dist.is_main:
        save_checkpoint(path, models)


def _say(dist, text: str) -> None:
    if dist.is_main:
        print(text, flush=True)


def _finish(dist, report: dict, started: float) -> dict:
    report["wall_time_s"] = round(time.perf_counter() - started, 1)
    if dist.is_main:
        out = Path(report["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(report, indent=1)
        atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(text))
        print("\n".join(["", "== addp.train finished =="] + [f"{k}: {v}" for k, v in report.items()]))
    return report


def parse_args(argv=None) -> argparse.Namespace:
    """The options, with `explicit`: the ones given on the command line (a recipe leaves them)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    args.explicit = recipes.explicit_dests(parser, argv)
    return args


def cli(argv=None) -> int:
    args = parse_args(argv)
    return run(main, args, args.output_dir)


if __name__ == "__main__":
    sys.exit(cli())
