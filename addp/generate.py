"""`python -m addp.generate`: sample images with the alternating denoising process.

Writes to --output-dir: numbered PNGs (000000.png, ...), grid.png (the first 64), samples.npz
(uint8 N x H x W x 3 under "arr_0", the input of FID tools) and generate.json (the settings).

Resumable: images are made in batches of --batch-size, and batch b always draws from its own
generator seeded by (--seed, b) and always samples a full batch, so image i depends only on
(checkpoint, settings, seed, batch size, i) — never on how many images were made before or
asked for now. A batch whose PNGs all exist is skipped; missing PNGs are written atomically.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .cli import (ArgumentParser, add_checkpoint_args, add_runtime_args, add_sampler_args, load_pipeline,
                  output_folder, positive_int, run_command, sampler_options, sampler_summary)
from .errors import AddpError
from .files import atomic_write
from .pipeline import ADDPPipeline, to_uint8
from .precision import autocast, resolve_precision
from .registry import build_model

GRID_IMAGES = 64
SETTINGS = ("checkpoint", "tokenizer", "random_init", "steps", "schedule", "temperature", "temperature_schedule",
            "top_p", "parity", "seed", "batch_size", "precision")
# settings added later: what older generate.json files used
SETTING_DEFAULTS = {"precision": "fp32", "temperature_schedule": "annealed", "parity": False}


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser("generate", description=__doc__.split("\n\n")[0])
    add_checkpoint_args(p)
    p.add_argument("--random-init", action="store_true",
                   help="baseline: a freshly initialised network of the checkpoint's config (same tokenizer)")
    p.add_argument("--num-images", type=positive_int, default=64)
    p.add_argument("--batch-size", type=positive_int, default=32, help="fixes the batch boundaries (and so the images)")
    p.add_argument("--output-dir", type=output_folder, default="output/generate")
    p.add_argument("--overwrite", action="store_true", help="start over in a folder made with other settings")
    add_sampler_args(p)
    add_runtime_args(p)
    return p


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of batch ``batch_index``'s generator (distinct for every (seed, batch))."""
    return (seed * 1_000_003 + batch_index) % (2 ** 63)


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def _prepare_output(out: Path, settings: dict, overwrite: bool) -> None:
    record = out / "generate.json"
    if record.exists() and not overwrite:
        try:
            old = json.loads(record.read_text())
        except ValueError:
            old = None
        if not isinstance(old, dict):
            raise AddpError(f"{record} is not a settings file of addp.generate; use another --output-dir")
        diff = sorted(k for k in SETTINGS if old.get(k, SETTING_DEFAULTS.get(k)) != settings.get(k))
        if diff:
            raise AddpError(f"{out} holds images made with other settings ({', '.join(diff)}); "
                            f"use another --output-dir or --overwrite")


def _record_settings(out: Path, settings: dict, overwrite: bool) -> None:
    if overwrite:
        for f in out.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):
            f.unlink()
    atomic_write(out / "generate.json", lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=1)))


def _load_pipeline(args) -> ADDPPipeline:
    pipe = load_pipeline(args)
    if args.random_init:
        torch.manual_seed(args.seed)
        pipe = ADDPPipeline(build_model(pipe.net.config).to(pipe.device), pipe.tokenizer)
    return pipe


def _save_png(path: Path, image: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def main(args) -> dict:
    config = args.sampler_config
    out = Path(args.output_dir)
    values = {**vars(args), **dataclasses.asdict(config), "checkpoint": str(Path(args.checkpoint).resolve())}
    settings = {k: values[k] for k in SETTINGS}
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings["precision"] = resolve_precision(args.precision, device)  # what made the images
    _prepare_output(out, settings, args.overwrite)
    pipe = _load_pipeline(args)
    _record_settings(out, settings, args.overwrite)

    from tqdm.auto import tqdm
    N, B = args.num_images, args.batch_size
    made = 0
    with tqdm(total=N, desc="generating", unit="img") as bar:
        for b, start in enumerate(range(0, N, B)):
            indices = range(start, min(start + B, N))
            todo = [i for i in indices if not (out / image_name(i)).exists()]
            if todo:
                g = torch.Generator(pipe.device).manual_seed(batch_seed(args.seed, b))
                with autocast(args.precision, pipe.device):
                    images = pipe(num_images=B, generator=g, output_type="pt", cuda_graph=args.cuda_graph,
                                  compile=args.compile, **sampler_options(config)).images
                arr = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
                for i in todo:
                    _save_png(out / image_name(i), arr[i - start])
                made += len(todo)
            bar.update(len(indices))

    samples = np.stack([np.asarray(Image.open(out / image_name(i)).convert("RGB")) for i in range(N)])
    atomic_write(out / "samples.npz", lambda tmp: np.savez(open(tmp, "wb"), arr_0=samples))
    grid = _grid(samples[:GRID_IMAGES])
    atomic_write(out / "grid.png", lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
    return {"output_dir": str(out), "num_images": N, "generated_now": made, "skipped": N - made,
            "npz": str(out / "samples.npz"), "grid": str(out / "grid.png"), "seed": args.seed,
            **sampler_summary(args)}


def _grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """(n, H, W, 3) uint8 -> one image, ceil(sqrt(n)) columns, ``pad`` px of black between."""
    n, H, W, _ = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    grid = np.zeros((rows * (H + pad) + pad, cols * (W + pad) + pad, 3), dtype=np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, cols)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = image
    return grid


def cli(argv=None) -> int:
    return run_command("generate", get_args_parser(), main, argv,
                       interrupted="the images written so far are kept; run the same command again to resume")


if __name__ == "__main__":
    sys.exit(cli())
