"""`python -m addp.visualize`: one generation run, step by step (the paper's Fig. 16).

Rows are the images; for each shown step there is a group of three tiles:
  image   the decoded image x after the step
  mask    the positions still unreliable after the step (white), upscaled to the image size
  tokens  the ids after the step (candidates at unreliable positions) coloured by the PCA of
          the network's token embeddings (``token_embedding_pca``), upscaled (nearest)
Shown steps (1-based): 1, 1 + k, 1 + 2k, ... and always the last, k = --every. Every tile is
the image size times --scale (nearest). Writes one PNG (atomically) and prints a JSON line.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from . import sampling as S
from .cli import (ArgumentParser, add_checkpoint_args, add_runtime_args, add_sampler_args, load_pipeline,
                  png_file, positive_int, run_command, sampler_summary)
from .runs.images import save_png
from .sampling.image_io import to_uint8
from .runtime.precision import resolve_precision
from .runtime.tuning import tune_for_device

MIN_TILE = 64  # default --scale: the smallest integer making a tile at least this many pixels
MARGIN = 4  # around the figure
PAD = 2  # between tiles of a group and between rows
GAP = 10  # between step groups
HEADER = 28  # label band above the tiles: "step s/T", then "image mask tokens"
BACKGROUND = 96
TEXT = (255, 255, 255)
KINDS = ("image", "mask", "tokens")


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser("visualize", description=__doc__.split("\n\n")[0])
    add_checkpoint_args(p)
    p.add_argument("--num-images", type=positive_int, default=4, help="rows of the figure")
    p.add_argument("--every", type=positive_int, default=1, help="show every k-th step (the first and last always)")
    p.add_argument("--scale", type=positive_int, default=None,
                   help=f"integer upscaling of every tile; default: the smallest making tiles >= {MIN_TILE} px")
    p.add_argument("--output", type=png_file, default="denoising_steps.png", help="the figure (PNG)")
    add_sampler_args(p)
    add_runtime_args(p, compile="the ADDP network and the tokenizer's decoder (pays off for many batches)")  # no --cuda-graph: every step is kept, no graph replay
    return p


# --------------------------------------------------------------------------- layout
def shown_steps(steps: int, every: int) -> list[int]:
    """0-based indices of the steps shown: 0, k, 2k, ... and steps - 1."""
    shown = list(range(0, steps, every))
    if shown[-1] != steps - 1:
        shown.append(steps - 1)
    return shown


def default_scale(image_size: int) -> int:
    return max(1, math.ceil(MIN_TILE / image_size))


def figure_size(rows: int, groups: int, tile_h: int, tile_w: int) -> tuple[int, int]:
    """(width, height) of the figure in pixels."""
    group_w = len(KINDS) * tile_w + (len(KINDS) - 1) * PAD
    width = 2 * MARGIN + groups * group_w + (groups - 1) * GAP
    height = HEADER + 2 * MARGIN + rows * tile_h + (rows - 1) * PAD
    return width, height


def tile_origin(row: int, group: int, kind: int, tile_h: int, tile_w: int) -> tuple[int, int]:
    """(x, y) of the top-left pixel of tile ``kind`` (0 image, 1 mask, 2 tokens) of a row and step group."""
    group_w = len(KINDS) * tile_w + (len(KINDS) - 1) * PAD
    x = MARGIN + group * (group_w + GAP) + kind * (tile_w + PAD)
    y = HEADER + MARGIN + row * (tile_h + PAD)
    return x, y


# --------------------------------------------------------------------------- tiles
@torch.no_grad()
def token_embedding_pca(net, ids: torch.Tensor) -> torch.Tensor:
    """Paper Fig. 16: ids (B, L) in [0, K) -> images (B, 3, h, w) in [0, 1], h = w = sqrt(L).

    Each token's ADDP embedding (``net.token_emb``) is projected on the first 3 principal
    components of the K codebook rows of the embedding table; each component is min-max
    normalised over the K codebook rows, so colours are comparable across images and steps.
    """
    K = net.config.codebook_size
    table = net.token_emb.weight[:K].float()  # (K, D)
    mean = table.mean(0)
    _, _, vh = torch.linalg.svd(table - mean, full_matrices=False)
    components = vh[:3].T  # (D, 3)
    proj_codebook = (table - mean) @ components  # (K, 3)
    lo, hi = proj_codebook.min(0).values, proj_codebook.max(0).values
    proj = proj_codebook[ids]  # (B, L, 3): a row of the table per id
    proj = ((proj - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    B, L = ids.shape
    side = math.isqrt(L)
    if side * side != L:
        raise ValueError(f"{L} tokens do not form a square grid")
    return proj.transpose(1, 2).reshape(B, 3, side, side)


def upscale(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W) by pixel repetition (nearest); exact when H, W are multiples."""
    h, w = images.shape[-2:]
    H, W = size
    if H % h == 0 and W % w == 0:
        return images.repeat_interleave(H // h, dim=-2).repeat_interleave(W // w, dim=-1)
    return F.interpolate(images, size=size, mode="nearest")


def step_tiles(net, result: S.GenerationOutput, step: int, scale: int) -> list[np.ndarray]:
    """The three tiles of every image at ``step``: [image, mask, tokens], each (N, H*scale, W*scale, 3) uint8."""
    x = result.step_images[step].float().cpu()  # (N, 3, H, W)
    N, _, H, W = x.shape
    size = (H * scale, W * scale)
    side = math.isqrt(result.step_masks[step].shape[1])
    mask = result.step_masks[step].cpu().float().reshape(N, 1, side, side).expand(-1, 3, -1, -1)
    pca = token_embedding_pca(net, result.step_ids[step].to(next(net.parameters()).device)).float().cpu()
    image_tile = upscale(to_uint8(x), size)
    mask_tile = upscale(upscale(to_uint8(mask), (H, W)), size)
    pca_tile = upscale(upscale(to_uint8(pca), (H, W)), size)
    return [t.permute(0, 2, 3, 1).numpy() for t in (image_tile, mask_tile, pca_tile)]


def make_figure(net, result: S.GenerationOutput, steps: list[int], scale: int) -> np.ndarray:
    """The figure (height, width, 3) uint8 of the given 0-based ``steps`` of a run."""
    N, _, H, W = result.step_images[0].shape
    th, tw = H * scale, W * scale
    T = len(result.step_images)
    width, height = figure_size(N, len(steps), th, tw)
    fig = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    for g, s in enumerate(steps):
        for k, tiles in enumerate(step_tiles(net, result, s, scale)):
            for r in range(N):
                x0, y0 = tile_origin(r, g, k, th, tw)
                fig[y0:y0 + th, x0:x0 + tw] = tiles[r]
    image = Image.fromarray(fig)
    _draw_labels(image, steps, T, th, tw)
    return np.asarray(image)


def _draw_labels(image: Image.Image, steps: list[int], T: int, th: int, tw: int) -> None:
    """Write "step s/T" over each group and the tile kinds under it, inside the header band."""
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for g, s in enumerate(steps):
        x0, _ = tile_origin(0, g, 0, th, tw)
        draw.text((x0, MARGIN), f"step {s + 1}/{T}", fill=TEXT, font=font)
        for k, kind in enumerate(KINDS):
            xk, _ = tile_origin(0, g, k, th, tw)
            draw.text((xk, MARGIN + HEADER // 2), kind, fill=TEXT, font=font)


# --------------------------------------------------------------------------- command
def main(args) -> dict:
    config = args.sampler_config
    pipe = load_pipeline(args)
    tune_for_device(pipe.device)
    scale = args.scale if args.scale is not None else default_scale(pipe.image_size)
    generator = torch.Generator(pipe.device).manual_seed(args.seed)
    result = S.generate(pipe.net, pipe.tokenizer, args.num_images, config, generator=generator,
                        return_intermediates=True, compile=args.compile,
                        precision=resolve_precision(args.precision, pipe.device))
    steps = shown_steps(config.steps, args.every)
    fig = make_figure(pipe.net, result, steps, scale)
    save_png(args.output, fig)
    return {"output": args.output, "num_images": args.num_images, "shown_steps": [s + 1 for s in steps],
            "scale": scale, "size": [fig.shape[1], fig.shape[0]], "seed": args.seed, **sampler_summary(args)}


def cli(argv=None) -> int:
    return run_command("visualize", get_args_parser(), main, argv)


if __name__ == "__main__":
    sys.exit(cli())
