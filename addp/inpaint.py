"""`python -m addp.inpaint`: fill a hole, grow the canvas, or uncrop one image with ADDP.

Exactly one mode:
  --mask MASK.png                      inpaint: white (>= 128) mask pixels are the hole
  --left/--right/--top/--bottom N      outpaint: grow the canvas by these margins (pixels)
  --uncrop SCALE                       uncrop: centre the image in a SCALE times larger canvas
                                       (the result has the model's image size)

Writes --output (default ``<image stem>_inpainted.png`` in the current folder) and
``<output stem>_side_by_side.png`` next to it: the input, with the hole painted mid-grey
and placed on the result's canvas, | the result. Pixels outside the hole are the input's,
unchanged. Prints one JSON summary line. An existing output file is replaced only with
--overwrite, and an input (--image, --mask) never.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .cli import (ArgumentParser, add_checkpoint_args, add_runtime_args, add_sampler_args, existing_file,
                  load_pipeline, number, output_file, run_command, sampler_summary)
from .errors import AddpError
from .runs.images import save_png
from .runs.files import check_output_file
from .sampling.image_io import mask_tensor, resize_images, to_uint8
from .sampling.pipeline import MAX_MARGIN
from .runs.images import open_image
from .runtime.precision import resolve_precision
from .runtime.tuning import tune_for_device

HOLE_GREY = 128  # how the hole is shown in the side-by-side's input panel
GAP = 2  # pixels between the two panels of the side-by-side
GAP_COLOUR = 255
MARGINS = ("left", "right", "top", "bottom")


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser("inpaint", description=__doc__.split("\n\n")[0])
    add_checkpoint_args(p)
    p.add_argument("--image", required=True, type=existing_file, help="the input image (any size; converted to RGB)")
    p.add_argument("--mask", "--mask-image", default=None, type=existing_file,
                   help="inpaint: mask image of the input's size, white = hole")
    for side in MARGINS:
        p.add_argument(f"--{side}", type=int, default=None, metavar="N", help=f"outpaint: pixels added on the {side}")
    p.add_argument("--uncrop", type=number(1, low_open=True), default=None, metavar="SCALE",
                   help="uncrop: the canvas is SCALE (> 1) times the image")
    p.add_argument("--output", default=None, type=output_file,
                   help="result PNG; default: <image stem>_inpainted.png in the current folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output and its _side_by_side.png (never --image or --mask)")
    add_sampler_args(p)
    add_runtime_args(p)
    p.add_check(_check_mode)
    return p


def side_by_side_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}_side_by_side.png")


def _check_mode(args) -> None:
    """Exactly one mode, with sound margins; sets args.mode and the default --output."""
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
    args.mode = {"--mask": "inpaint", "--uncrop": "uncrop"}.get(given[0], "outpaint")
    margins = {side: getattr(args, side) or 0 for side in MARGINS}
    if args.mode == "outpaint" and (min(margins.values()) < 0 or max(margins.values()) == 0):
        raise AddpError("outpaint margins must be >= 0 with at least one > 0, got "
                        + " ".join(f"--{k} {v}" for k, v in margins.items()))
    if max(margins.values()) > MAX_MARGIN:
        raise AddpError(f"outpaint margins must be at most {MAX_MARGIN} pixels, got "
                        + " ".join(f"--{k} {v}" for k, v in margins.items() if v > MAX_MARGIN))
    if args.output is None:
        args.output = str(check_output_file(Path.cwd() / f"{Path(args.image).stem}_inpainted.png"))
    _check_not_replacing(args)


def _check_not_replacing(args) -> None:
    """The outputs are PNG files that are neither an input nor, without --overwrite, an existing file."""
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise AddpError(f"--output is written as PNG: give a .png path, got {output}")
    inputs = {Path(p).resolve() for p in (args.image, args.mask) if p}
    for path in (output, side_by_side_path(output)):
        if path.resolve() in inputs:
            raise AddpError(f"{path} is an input of this command; give another --output")
        if path.exists() and not args.overwrite:
            raise AddpError(f"{path} exists; pass --overwrite to replace it, or give another --output")


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
    mode = args.mode
    image = open_image(args.image).convert("RGB")  # fails early on an unreadable file
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
    output = Path(args.output)

    pipe = load_pipeline(args)
    tune_for_device(pipe.device)
    options = dict(config=args.sampler_config, generator=torch.Generator(pipe.device).manual_seed(args.seed),
                   precision=resolve_precision(args.precision, pipe.device))
    if mode == "inpaint":
        result = pipe.inpaint(image, mask, **options)
    elif mode == "outpaint":
        result = pipe.outpaint(image, **margins, **options)
    else:
        result = pipe.uncrop(image, args.uncrop, **options)

    result_arr = np.asarray(result.convert("RGB"), dtype=np.uint8)
    panel, canvas_hole = _input_panel(image, mode, args, result.size, hole)
    sbs_path = side_by_side_path(output)
    save_png(output, result)
    save_png(sbs_path, Image.fromarray(side_by_side(panel, result_arr)))
    return {"output": str(output), "side_by_side": str(sbs_path), "mode": mode,
            "input_size": list(image.size), "output_size": list(result.size),
            "hole_pixels": int(canvas_hole.sum()), "seed": args.seed, **sampler_summary(args)}


def cli(argv=None) -> int:
    return run_command("inpaint", get_args_parser(), main, argv)


if __name__ == "__main__":
    sys.exit(cli())
