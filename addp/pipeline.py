"""`ADDPPipeline`: unconditional generation, inpainting, outpainting and uncropping.

    pipe = ADDPPipeline.from_pretrained("addp.safetensors")       # ADDP network + VQ tokenizer
    images = pipe(num_images=16, generator=torch.Generator().manual_seed(0))   # 16 PIL images
    filled = pipe.inpaint(image, mask)                              # mask True / white = hole

Inpainting follows the paper (App. E): the hole is filled with the mean of the visible
pixels and the image is encoded to tokens; tokens whose token cell touches the hole are
unreliable, the others are kept as reliable tokens for the whole run. The alternating
process starts at the schedule step whose mask ratio matches the unreliable fraction and
runs the sampler's own step (`sampler._denoise_step`) to the end; the result is blended into
the input by the pixel mask, so known pixels come back unchanged, bit for bit.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from . import sampler as S
from . import hub
from .checkpoint import save_pretrained
from .images import open_image, to_8bit, to_rgb
from .registry import AddpError

ImageLike = Union[Image.Image, torch.Tensor, str, os.PathLike]


# --------------------------------------------------------------------------- image conversion
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
    if x.dim() != 4 or x.shape[1] != 3:
        raise AddpError(f"image tensor must be (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
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


# --------------------------------------------------------------------------- pipeline
class ADDPPipeline:
    """An ADDP network and its VQ tokenizer, ready to generate and edit images."""

    def __init__(self, net: nn.Module, tokenizer: nn.Module):
        S._check_models(net, tokenizer)
        self.net, self.tokenizer = net.eval(), tokenizer.eval()

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path, filename: Optional[str] = None, revision: Optional[str] = None,
                        tokenizer=None, device=None, **hub_kwargs) -> "ADDPPipeline":
        """Load from a save_pretrained folder, our .safetensors (addp + tokenizer), an official
        addp-vit-*.pth, or a Hub repo id: ``from_pretrained("Changyao/ADDP",
        filename="addp-vit-base-16.pth")`` (see `addp.hub.pipeline_models`).

        tokenizer: a VQTokenizer or a VQGAN checkpoint (ours or vqgan_jax_strongaug.ckpt);
            needed when the checkpoint holds no tokenizer.
        device: where to run; default cuda when available, else cpu.
        hub_kwargs: cache_dir, local_files_only (huggingface_hub's).
        """
        net, tok = hub.pipeline_models(name_or_path, filename, revision, tokenizer, **hub_kwargs)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(net.to(device), tok.to(device))

    def save_pretrained(self, folder) -> Path:
        """Write ``folder/model_index.json``, ``folder/addp/`` and ``folder/tokenizer/`` (each a
        ``config.json`` + ``model.safetensors``), atomically; `from_pretrained` reads it back."""
        return save_pretrained(folder, {"addp": self.net, "tokenizer": self.tokenizer}, type(self).__name__)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def image_size(self) -> int:
        return self.net.config.image_size

    # -- unconditional generation ---------------------------------------------------------
    @torch.no_grad()
    def __call__(self, num_images: int = 16, steps: int = 20, schedule: str = "cosine", temperature: float = 6.0,
                 top_p: float = 1.0, generator: Optional[torch.Generator] = None, batch_size: Optional[int] = None,
                 output_type: str = "pil", return_dict: bool = True, progress: bool = False,
                 cuda_graph: Optional[bool] = None, compile: bool = False, temperature_schedule: str = "annealed",
                 parity: bool = False):
        """Generate ``num_images`` images, ``batch_size`` at a time (default: all at once).
        On a GPU each batch replays a captured CUDA graph (``cuda_graph=False``: eager);
        ``compile=True`` compiles the networks first (``sampler.compiled_models``).

        Returns ``{"images": ...}`` (or the bare list/tensor with ``return_dict=False``):
        a list of PIL images (output_type "pil") or a (N, 3, H, W) tensor in [0, 1] ("pt").
        """
        if output_type not in ("pil", "pt"):
            raise AddpError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        config = S.SamplerConfig(steps=steps, schedule=schedule, temperature=temperature, top_p=top_p,
                                 temperature_schedule=temperature_schedule, parity=parity)
        images = S.generate(self.net, self.tokenizer, num_images, config, generator=generator,
                            batch_size=batch_size, progress=progress, cuda_graph=cuda_graph,
                            compile=compile)
        images = to_pil(images) if output_type == "pil" else images
        return {"images": images} if return_dict else images

    # -- inpainting -----------------------------------------------------------------------
    @torch.no_grad()
    def inpaint(self, image: ImageLike, mask, steps: int = 20, schedule: str = "cosine", temperature: float = 6.0,
                top_p: float = 1.0, generator: Optional[torch.Generator] = None, temperature_schedule: str = "annealed",
                parity: bool = False):
        """Fill the hole of ``image`` (``mask`` True / white) and return the image, of the same
        kind and size as the input (PIL for PIL or a path, a tensor for a tensor); pixels
        outside the hole are returned unchanged.

        Images of another size than the model's are resized to it for the model and the
        result is resized back before blending. One mask for every image of a batch.
        """
        x, was_pil = _image_tensor(image)
        hole = mask_tensor(mask)
        if tuple(hole.shape[-2:]) != tuple(x.shape[-2:]):
            raise AddpError(f"mask size {tuple(hole.shape[-2:])} differs from image size {tuple(x.shape[-2:])}")
        if hole.shape[0] not in (1, x.shape[0]) or (hole.shape[0] > 1 and not (hole == hole[:1]).all()):
            raise AddpError("inpaint takes one mask for every image of a batch")
        hole = hole[:1]
        if not hole.any():
            raise AddpError("the mask is all black: there is no hole to fill")
        if hole.all():
            raise AddpError("the mask is all white: no pixel is known (use the pipeline's __call__ to generate)")
        config = S.SamplerConfig(steps=steps, schedule=schedule, temperature=temperature, top_p=top_p,
                                 temperature_schedule=temperature_schedule, parity=parity)
        filled = self._inpaint_model_size(x.to(self.device), hole.to(self.device), config, generator)
        out = torch.where(hole.to(self.device), filled, x.to(self.device))  # known pixels: the input, exactly
        return _like(out, image, was_pil)

    def _inpaint_model_size(self, x, hole, config, generator) -> torch.Tensor:
        """(B, 3, H, W), hole (1, 1, H, W) -> generated images (B, 3, H, W), not yet blended."""
        size = (self.image_size, self.image_size)
        H, W = x.shape[-2:]
        xs = resize_images(x, size)
        # resized: a model pixel is in the hole when it overlaps any hole pixel
        holes = hole if (H, W) == size else F.adaptive_max_pool2d(hole.float(), size) > 0
        images = self.fill(xs, holes.expand(x.shape[0], -1, -1, -1), config, generator)
        return resize_images(images, (H, W))

    def fill(self, x: torch.Tensor, hole: torch.Tensor, config: S.SamplerConfig = S.SamplerConfig(),
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The alternating process from a partly known image, at the model size.

        x (B, 3, S, S) in [0, 1]; hole (B, 1, S, S) bool, the same in every row.
        Returns the generated images (B, 3, S, S) (not blended).
        """
        L = self.net.config.num_patches
        with S._EvalMode(self.net, self.tokenizer):
            visible = (~hole).float()
            mean = (x * visible).sum((2, 3), keepdim=True) / visible.sum((2, 3), keepdim=True).clamp_min(1)
            x = torch.where(hole, mean.expand_as(x), x)  # (B, 3, S, S): the hole holds the visible mean
            ids = self.tokenizer.encode(x)  # (B, L)
            cell = self.image_size // self.net.config.grid_size
            mask = F.max_pool2d(hole.float(), cell).flatten(1) > 0  # (B, L): token cells touching the hole
            unreliable = int(mask[0].sum())
            lengths = S.mask_schedule(L, config.steps, config.schedule, config.parity)
            start = self.start_step(L, unreliable, config)
            taus = S.choice_temperatures(config)
            x = self.tokenizer.decode_ids(ids).clamp(0, 1)  # (B, 3, S, S): the decoded starting image
            num_reliable = L - unreliable
            for s in range(start, config.steps):
                mask_len = min(lengths[s], L - num_reliable)  # known tokens never become unreliable again
                x, ids, mask = S._denoise_step(self.net, self.tokenizer, x, ids, mask, num_reliable, mask_len,
                                               taus[s], config.top_p, generator)
                num_reliable = L - mask_len
        return x

    @staticmethod
    def start_step(num_tokens: int, unreliable: int, config: S.SamplerConfig) -> int:
        """The step to start from: the last s whose input mask ratio m(s/T) still masks at
        least ``unreliable`` of ``num_tokens`` positions (0 when every position is unreliable)."""
        T = config.steps
        start = 0
        for s in range(T):
            r = s / T
            ratio = math.cos(math.pi / 2 * r) if config.schedule == "cosine" else 1 - r
            if math.ceil(num_tokens * ratio) >= unreliable:
                start = s
        return start

    # -- outpainting / uncropping ---------------------------------------------------------
    @torch.no_grad()
    def outpaint(self, image: ImageLike, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0, **kwargs):
        """Grow the canvas by the margins (pixels) and generate the new border.

        The canvas is grown by the margins rounded up to the token stride, filled, and cropped
        so the output is exactly (H + top + bottom, W + left + right). ``kwargs`` go to ``inpaint``.
        """
        margins = (left, right, top, bottom)
        if any(not isinstance(m, int) or m < 0 for m in margins):
            raise AddpError(f"margins must be integers >= 0, got left={left} right={right} top={top} bottom={bottom}")
        if not any(margins):
            raise AddpError("outpaint needs at least one margin > 0")
        x, was_pil = _image_tensor(image)
        stride = self.image_size // self.net.config.grid_size
        l, r, t, b = (-(-m // stride) * stride for m in margins)
        H, W = x.shape[-2:]
        canvas = F.pad(x, (l, r, t, b), value=0.0)
        hole = torch.ones(1, 1, H + t + b, W + l + r, dtype=torch.bool)
        hole[..., t:t + H, l:l + W] = False
        out = self.inpaint(canvas, hole, **kwargs)  # (B, 3, H', W')
        return _like(out[..., t - top:t + H + bottom, l - left:l + W + right], image, was_pil)

    @torch.no_grad()
    def uncrop(self, image: ImageLike, scale: float = 2.0, **kwargs):
        """Centre ``image`` in a canvas ``scale`` times larger, at the model size, and fill the
        rest. Returns a model-size image (PIL for PIL input, else a tensor)."""
        if not (isinstance(scale, (int, float)) and scale > 1):
            raise AddpError(f"scale must be a number > 1, got {scale!r}")
        x, was_pil = _image_tensor(image)
        S_ = self.image_size
        H, W = x.shape[-2:]
        fit = S_ / scale / max(H, W)  # the image's longer side takes 1/scale of the canvas
        h, w = max(1, round(H * fit)), max(1, round(W * fit))
        t, l = (S_ - h) // 2, (S_ - w) // 2
        canvas = torch.zeros(x.shape[0], 3, S_, S_)
        canvas[..., t:t + h, l:l + w] = resize_images(x, (h, w))
        hole = torch.ones(1, 1, S_, S_, dtype=torch.bool)
        hole[..., t:t + h, l:l + w] = False
        return _like(self.inpaint(canvas, hole, **kwargs), image, was_pil)
