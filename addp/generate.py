"""`python -m addp.generate`: sample images with the alternating denoising process.

Writes to --output-dir: numbered PNGs (000000.png, ...), grid.png (the first 64), samples.npz
(uint8 N x H x W x 3 under "arr_0", the input of FID tools) and generate.json (the settings).

Resumable: images are made in batches of --batch-size, and batch b always draws from its own
generator seeded by (--seed, b) and always samples a full batch, so image i depends only on
(checkpoint, settings, seed, batch size, i) — never on how many images were made before or
asked for now. A batch whose PNGs all exist is skipped; missing PNGs are written atomically.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import sampler as S
from .checkpoint import atomic_write
from .cli import run
from .pipeline import ADDPPipeline, to_uint8
from .registry import AddpError, build_model
from .trainer import PRECISIONS, autocast_dtype

GRID_IMAGES = 64
SETTINGS = ("checkpoint", "tokenizer", "random_init", "steps", "schedule", "temperature", "top_p", "seed",
            "batch_size", "precision")
SETTING_DEFAULTS = {"precision": "fp32"}  # settings added later: what older generate.json files used


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m addp.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="our .safetensors (addp + tokenizer), a folder, or addp-vit-*.pth")
    p.add_argument("--tokenizer", default=None, help="VQGAN checkpoint when --checkpoint holds no tokenizer")
    p.add_argument("--random-init", action="store_true",
                   help="baseline: a freshly initialised network of the checkpoint's config (same tokenizer)")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="fixes the batch boundaries (and so the images)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--schedule", default="cosine", choices=S.SCHEDULES)
    p.add_argument("--temperature", type=float, default=6.0, help="Gumbel scale of the choice of positions")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="output/generate")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each batch as one captured CUDA graph (default: on for GPUs; same images as eager)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the ADDP network and the tokenizer's decoder (pays off for many batches)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="autocast of the networks (auto: bf16 on GPU, fp32 on CPU); fp32 as the official code")
    p.add_argument("--overwrite", action="store_true", help="start over in a folder made with other settings")
    return p


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of batch ``batch_index``'s generator (distinct for every (seed, batch))."""
    return (seed * 1_000_003 + batch_index) % (2 ** 63)


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def _prepare_output(out: Path, settings: dict, overwrite: bool) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise AddpError(f"cannot write to output folder {out} ({e.strerror or type(e).__name__})") from None
    record = out / "generate.json"
    if record.exists() and not overwrite:
        old = json.loads(record.read_text())
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
    pipe = ADDPPipeline.from_pretrained(args.checkpoint, tokenizer=args.tokenizer, device=args.device)
    if args.random_init:
        torch.manual_seed(args.seed)
        pipe = ADDPPipeline(build_model(pipe.net.config).to(pipe.device), pipe.tokenizer)
    return pipe


def _save_png(path: Path, image: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def main(args) -> dict:
    if args.num_images < 1 or args.batch_size < 1:
        raise AddpError(f"--num-images and --batch-size must be >= 1, got {args.num_images} and {args.batch_size}")
    config = S.SamplerConfig(steps=args.steps, schedule=args.schedule, temperature=args.temperature, top_p=args.top_p)
    out = Path(args.output_dir)
    settings = {k: getattr(args, k) for k in SETTINGS}
    settings["checkpoint"] = str(Path(args.checkpoint).resolve())
    _prepare_output(out, settings, args.overwrite)
    pipe = _load_pipeline(args)
    if args.cuda_graph and pipe.device.type != "cuda":
        raise AddpError(f"--cuda-graph needs a CUDA device; the model runs on {pipe.device}")
    _record_settings(out, settings, args.overwrite)
    amp = autocast_dtype(args.precision, pipe.device)

    from tqdm.auto import tqdm
    N, B = args.num_images, args.batch_size
    made = 0
    with tqdm(total=N, desc="generating", unit="img") as bar:
        for b, start in enumerate(range(0, N, B)):
            indices = range(start, min(start + B, N))
            todo = [i for i in indices if not (out / image_name(i)).exists()]
            if todo:
                g = torch.Generator(pipe.device).manual_seed(batch_seed(args.seed, b))
                with torch.autocast(pipe.device.type, dtype=amp, enabled=amp is not None):
                    images = pipe(num_images=B, generator=g, output_type="pt", return_dict=False,
                                  cuda_graph=args.cuda_graph, compile=args.compile, **_options(config))
                arr = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
                for i in todo:
                    _save_png(out / image_name(i), arr[i - start])
                made += len(todo)
            bar.update(len(indices))

    samples = np.stack([np.asarray(Image.open(out / image_name(i)).convert("RGB")) for i in range(N)])
    atomic_write(out / "samples.npz", lambda tmp: np.savez(open(tmp, "wb"), arr_0=samples))
    grid = _grid(samples[:GRID_IMAGES])
    atomic_write(out / "grid.png", lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
    summary = {"output_dir": str(out), "num_images": N, "generated_now": made, "skipped": N - made,
               "npz": str(out / "samples.npz"), "grid": str(out / "grid.png")}
    print(json.dumps(summary))
    return summary


def _options(config: S.SamplerConfig) -> dict:
    return dict(steps=config.steps, schedule=config.schedule, temperature=config.temperature, top_p=config.top_p)


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
    args = get_args_parser().parse_args(argv)
    return run(main, args, errors=(AddpError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(cli())
