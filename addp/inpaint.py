"""`python -m addp.inpaint`: fill a hole, grow the canvas, or uncrop one image with ADDP.

Exactly one mode:
  --mask MASK.png                      inpaint: white (>= 128) mask pixels are the hole
  --left/--right/--top/--bottom N      outpaint: grow the canvas by these margins (pixels)
  --uncrop SCALE                       uncrop: centre the image in a SCALE times larger canvas
                                       (the result has the model's image size)

Writes --output (default ``<image stem>_inpainted.png`` in the current folder) and
``<output stem>_side_by_side.png`` next to it: the input, with the hole painted mid-grey
and placed on the result's canvas, | the result. Pixels outside the hole are the input's,
unchanged. Prints one JSON summary line.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import sampler as S
from .checkpoint import atomic_write
from .cli import run
from .pipeline import ADDPPipeline, mask_tensor, open_image, resize_images, to_uint8
from .registry import AddpError
from .trainer import PRECISIONS, autocast_dtype

HOLE_GREY = 128  # how the hole is shown in the side-by-side's input panel
GAP = 2  # pixels between the two panels of the side-by-side
GAP_COLOUR = 255
MARGINS = ("left", "right", "top", "bottom")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m addp.inpaint", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="our .safetensors (addp + tokenizer), a folder, or addp-vit-*.pth")
    p.add_argument("--tokenizer", default=None, help="VQGAN checkpoint when --checkpoint holds no tokenizer")
    p.add_argument("--image", required=True, help="the input image (any size; converted to RGB)")
    p.add_argument("--mask", default=None, help="inpaint: mask image of the input's size, white = hole")
    for side in MARGINS:
        p.add_argument(f"--{side}", type=int, default=None, metavar="N", help=f"outpaint: pixels added on the {side}")
    p.add_argument("--uncrop", type=float, default=None, metavar="SCALE",
                   help="uncrop: the canvas is SCALE (> 1) times the image")
    p.add_argument("--steps", type=int, default=20, help="denoising steps T")
    p.add_argument("--schedule", default="cosine", choices=S.SCHEDULES, help="mask schedule")
    p.add_argument("--temperature", type=float, default=6.0, help="Gumbel scale of the choice of positions")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling of candidate ids (1: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="autocast of the networks (auto: bf16 on GPU, fp32 on CPU); fp32 as the official code")
    p.add_argument("--output", default=None, help="result PNG; default: <image stem>_inpainted.png in the current folder")
    return p


def side_by_side_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}_side_by_side.png")


def _mode(args) -> str:
    given = []
    if args.mask is not None:
        given.append("--mask")
    if any(getattr(args, side) is not None for side in MARGINS):
        given.append("--left/--right/--top/--bottom")
    if args.uncrop is not None:
        given.append("--uncrop")
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        raise AddpError(f"give exactly one of --mask, --left/--right/--top/--bottom, --uncrop (got {what})")
    return {"--mask": "inpaint", "--uncrop": "uncrop"}.get(given[0], "outpaint")


def check_output_file(path: Path) -> None:
    """Fail before any work when ``path`` cannot be written (its folder is made if missing)."""
    if path.is_dir():
        raise AddpError(f"--output {path} is a folder; give the path of a PNG file")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".{path.name}.write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise AddpError(f"cannot write to output folder {folder} ({e.strerror or type(e).__name__})") from None


def _save_png(path: Path, image: Image.Image) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def _input_panel(image: Image.Image, mode: str, args, result_size: tuple[int, int],
                 hole=None) -> tuple[np.ndarray, np.ndarray]:
    """The left panel: the input on the result's canvas (W, H), every hole pixel mid-grey.

    Returns the panel (H, W, 3) uint8 and the hole (H, W) bool of the result's canvas.
    """
    W, H = result_size
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if mode == "inpaint":
        panel = arr.copy()
        panel[hole] = HOLE_GREY
        return panel, hole
    if mode == "outpaint":
        t, l = args.top or 0, args.left or 0
        h, w = arr.shape[:2]
    else:  # uncrop: the placement ADDPPipeline.uncrop uses (the longer side takes 1/scale of the canvas)
        h0, w0 = arr.shape[:2]
        fit = H / args.uncrop / max(h0, w0)
        h, w = max(1, round(h0 * fit)), max(1, round(w0 * fit))
        t, l = (H - h) // 2, (W - w) // 2
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255
        arr = to_uint8(resize_images(x, (h, w)))[0].permute(1, 2, 0).numpy()
    panel = np.full((H, W, 3), HOLE_GREY, dtype=np.uint8)
    panel[t:t + h, l:l + w] = arr
    canvas_hole = np.ones((H, W), dtype=bool)
    canvas_hole[t:t + h, l:l + w] = False
    return panel, canvas_hole


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """(H, W, 3) and (H, W, 3) uint8 -> (H, 2 W + GAP, 3): left | right."""
    H, W, _ = right.shape
    out = np.full((H, 2 * W + GAP, 3), GAP_COLOUR, dtype=np.uint8)
    out[:, :W] = left
    out[:, W + GAP:] = right
    return out


def main(args) -> dict:
    mode = _mode(args)
    image = open_image(args.image).convert("RGB")  # fails early on a missing or unreadable file
    hole = None
    if mode == "inpaint":
        mask = open_image(args.mask)
        if mask.size != image.size:
            raise AddpError(f"mask size {mask.size[0]}x{mask.size[1]} differs from image size "
                            f"{image.size[0]}x{image.size[1]} (width x height)")
        hole = mask_tensor(mask)[0, 0].numpy()  # (H, W) bool, True = hole
        if not hole.any():
            raise AddpError(f"the mask {args.mask} is all black: there is no hole to fill")
        if hole.all():
            raise AddpError(f"the mask {args.mask} is all white: no pixel is known")
    margins = {side: getattr(args, side) or 0 for side in MARGINS}
    if mode == "outpaint" and (min(margins.values()) < 0 or max(margins.values()) == 0):
        raise AddpError("outpaint margins must be >= 0 with at least one > 0, got "
                        + " ".join(f"--{k} {v}" for k, v in margins.items()))
    if mode == "uncrop" and not (math.isfinite(args.uncrop) and args.uncrop > 1):
        raise AddpError(f"--uncrop must be a finite number > 1, got {args.uncrop}")
    config = S.SamplerConfig(steps=args.steps, schedule=args.schedule, temperature=args.temperature,
                             top_p=args.top_p)  # bad values fail here, before the checkpoint is read
    output = Path(args.output) if args.output else Path.cwd() / f"{Path(args.image).stem}_inpainted.png"
    check_output_file(output)

    pipe = ADDPPipeline.from_pretrained(args.checkpoint, tokenizer=args.tokenizer, device=args.device)
    generator = torch.Generator(pipe.device).manual_seed(args.seed)
    options = dict(steps=config.steps, schedule=config.schedule, temperature=config.temperature,
                   top_p=config.top_p, generator=generator)
    amp = autocast_dtype(args.precision, pipe.device)
    with torch.autocast(pipe.device.type, dtype=amp, enabled=amp is not None):
        if mode == "inpaint":
            result = pipe.inpaint(image, mask, **options)
        elif mode == "outpaint":
            result = pipe.outpaint(image, **margins, **options)
        else:
            result = pipe.uncrop(image, args.uncrop, **options)

    result_arr = np.asarray(result.convert("RGB"), dtype=np.uint8)
    panel, canvas_hole = _input_panel(image, mode, args, result.size, hole)
    sbs_path = side_by_side_path(output)
    _save_png(output, result)
    _save_png(sbs_path, Image.fromarray(side_by_side(panel, result_arr)))
    summary = {"output": str(output), "side_by_side": str(sbs_path), "mode": mode,
               "input_size": list(image.size), "output_size": list(result.size),
               "hole_pixels": int(canvas_hole.sum()), "steps": config.steps, "temperature": config.temperature,
               "top_p": config.top_p, "seed": args.seed}
    print(json.dumps(summary))
    return summary


def cli(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return run(main, args, errors=(AddpError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(cli())
