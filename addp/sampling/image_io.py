"""Conversions between users' images (PIL, paths, arrays, tensors, masks) and the pipeline's
(B, 3, H, W) tensors in [0, 1]."""
from __future__ import annotations

import os
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import AddpError
from ..runs.images import open_image, to_8bit, to_rgb

# --------------------------------------------------------------------------- image conversion
ImageLike = Union[Image.Image, torch.Tensor, str, os.PathLike]
OUTPUT_TYPES = ("pil", "np", "pt")


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> B RGB PIL images (rounded to uint8)."""
    arr = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]



def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(..., H, W) in [0, 1] -> uint8 in [0, 255], rounded to nearest."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)



def _image_tensor(image: ImageLike) -> tuple[torch.Tensor, bool]:
    """An image (PIL, path, (3, H, W) or (B, 3, H, W) tensor in [0, 1]) -> ((B, 3, H, W) float, was_pil)."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    if isinstance(image, Image.Image):
        arr = np.asarray(to_rgb(image), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255, True
    if not isinstance(image, torch.Tensor):
        raise AddpError(f"image must be a PIL image, a path or a tensor, got {type(image).__name__}")
    x = image[None] if image.dim() == 3 else image
    if x.dim() != 4 or x.shape[1] != 3 or 0 in x.shape:
        raise AddpError(f"image tensor must be (3, H, W) or (B, 3, H, W) with B, H, W >= 1, got {tuple(image.shape)}")
    if not (x.is_floating_point() or x.dtype == torch.uint8):
        raise AddpError(f"image tensor must be float in [0, 1] or uint8, got {x.dtype}")
    if x.dtype == torch.uint8:
        return x.float() / 255, False
    return x.float(), False



def mask_tensor(mask) -> torch.Tensor:
    """A mask (PIL, path, (H, W) / (1, H, W) / (B, 1, H, W) tensor) -> (1 or B, 1, H, W) bool, True = hole."""
    if isinstance(mask, (str, os.PathLike)):
        mask = open_image(mask)
    if isinstance(mask, Image.Image):
        m = torch.from_numpy(np.asarray(to_8bit(mask).convert("L"), dtype=np.uint8).copy()) >= 128
    elif isinstance(mask, torch.Tensor):
        m = mask if mask.dtype == torch.bool else mask.float() >= 0.5
    else:
        raise AddpError(f"mask must be a PIL image, a path or a tensor, got {type(mask).__name__}")
    while m.dim() < 4:
        m = m[None]
    if m.shape[1] != 1:
        raise AddpError(f"mask must have one channel, got shape {tuple(mask.shape)}")
    return m



def _like(out: torch.Tensor, image, was_pil: bool):
    """(B, 3, H, W) in [0, 1] -> the kind of ``image``: PIL (a list when B > 1), or a tensor of
    its rank and dtype (uint8 stays uint8)."""
    if was_pil:
        return to_pil(out)[0] if out.shape[0] == 1 else to_pil(out)
    if image.dtype == torch.uint8:
        out = to_uint8(out)
    return out[0] if image.dim() == 3 else out



def resize_images(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def as_output_type(images: torch.Tensor, output_type: str):
    """(N, 3, H, W) in [0, 1] -> the images as ``output_type`` ("pil" | "np" | "pt") gives them."""
    if output_type == "pil":
        return to_pil(images)
    if output_type == "np":
        return images.float().permute(0, 2, 3, 1).cpu().numpy()
    return images.float()


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise AddpError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
