"""`ADDPPipeline`: unconditional generation, inpainting, outpainting and uncropping.

    pipe = ADDPPipeline.from_pretrained("addp.safetensors")       # ADDP network + VQ tokenizer
    images = pipe(batch_size=16, generator=torch.Generator().manual_seed(0)).images   # 16 PIL images
    filled = pipe.inpaint(image, mask_image)                        # mask True / white = hole

The call follows diffusers' pipelines (``batch_size``, ``num_inference_steps``, ``generator``,
``output_type``, ``return_dict``, ``callback_on_step_end``, ``pipe.to(device, dtype)``,
``progress_bar``, ``components``, diffusers' keywords of ``from_pretrained`` /
``save_pretrained``: `addp.sampling.diffusers_compat`); docs/generation.md describes it. diffusers
itself loads a saved folder as `addp.sampling.diffusers_pipeline.ADDPDiffusionPipeline`.

Inpainting follows the paper (App. E): the hole is filled with the mean of the visible
pixels and the image is encoded to tokens; tokens whose token cell touches the hole are
unreliable, the others are kept as reliable tokens for the whole run. The alternating
process starts at the schedule step whose mask ratio matches the unreliable fraction
(``addp.sampling.Schedule.start_step``) and runs the sampler's loop (``addp.sampling.denoise``) to the
end; the result is blended into the input by the pixel mask, so known pixels come back
unchanged, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .accelerate import clear_cache
from .image_io import ImageLike, _image_tensor, _like, as_output_type, check_output_type, mask_tensor, resize_images
from .config import Generators, SamplerConfig, sampler_config
from .diffusers_compat import (LOAD_KEYWORDS, check_torch_dtype, check_use_safetensors, check_variant, image_counts,
                               refuse_unknown, save_options)
from .driver import generate
from .schedule import Schedule
from .step import StepCallback, check_finite_images, check_generators, check_models, denoise, eval_mode
from ..models.checkpoint import pipeline_models, save_pretrained
from ..models.hub import upload
from ..errors import AddpError
from ..runtime.devices import check_device
from ..runtime.precision import precision_context
from ..runs.progress import Progress


MAX_MARGIN = 16384  # outpaint margin, pixels: a wider border could not be held in memory


# --------------------------------------------------------------------------- pipeline
@dataclass
class ADDPPipelineOutput:
    """What ``ADDPPipeline.__call__`` returns (diffusers' ``ImagePipelineOutput``).

    images: N PIL images ("pil"), an (N, H, W, 3) float32 array in [0, 1] ("np"), or an
        (N, 3, H, W) float tensor in [0, 1] on the model's device ("pt").
    ``output[0]`` and ``output["images"]`` are ``output.images`` too.
    """

    images: Union[list[Image.Image], np.ndarray, torch.Tensor]

    def to_tuple(self) -> tuple:
        return (self.images,)

    def __getitem__(self, key):
        return self.to_tuple()[key] if isinstance(key, int) else getattr(self, key)


class ADDPPipeline:
    """An ADDP network and its VQ tokenizer, ready to generate and edit images."""

    def __init__(self, net: nn.Module, tokenizer: nn.Module):
        check_models(net, tokenizer)
        self.net, self.tokenizer = net.eval(), tokenizer.eval()
        self._progress_bar_config: dict = {}

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path, filename: Optional[str] = None, revision: Optional[str] = None,
                        tokenizer=None, device=None, *, torch_dtype: Optional[torch.dtype] = None,
                        cache_dir=None, local_files_only: bool = False, token=None, variant: Optional[str] = None,
                        use_safetensors: Optional[bool] = None, **unknown) -> "ADDPPipeline":
        """Load from a save_pretrained folder, our .safetensors (addp + tokenizer), an official
        addp-vit-*.pth, or a Hub repo id: ``from_pretrained("Changyao/ADDP",
        filename="addp-vit-base-16.pth")`` (see `addp.models.checkpoint.pipeline_models`).

        tokenizer: a VQTokenizer or a VQGAN checkpoint (ours or vqgan_jax_strongaug.ckpt);
            needed when the checkpoint holds no tokenizer.
        device: where to run; default cuda when available, else cpu.
        torch_dtype: cast both networks to it after loading.
        revision, cache_dir, local_files_only, token: huggingface_hub's, for Hub repos.
        variant: refused (our folders have none); use_safetensors: None, or True to refuse a
            PyTorch file. Any other keyword is refused in one line.
        """
        refuse_unknown("ADDPPipeline.from_pretrained", unknown, LOAD_KEYWORDS)
        torch_dtype = check_torch_dtype(torch_dtype)
        check_variant(variant)
        check_use_safetensors(use_safetensors, filename if filename is not None else name_or_path)
        device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        net, tok = pipeline_models(name_or_path, filename, revision, tokenizer, cache_dir=cache_dir,
                                   local_files_only=local_files_only, token=token)
        return cls(net.to(device), tok.to(device)).to(dtype=torch_dtype)

    def save_pretrained(self, folder, safe_serialization: bool = True, variant: Optional[str] = None,
                        push_to_hub: bool = False, **push_kwargs) -> Path:
        """Write ``folder/model_index.json``, ``folder/addp/`` and ``folder/tokenizer/`` (each a
        ``config.json`` + ``model.safetensors``) and ``folder/addp_pipeline.py`` (diffusers'
        entry), atomically; `from_pretrained` and ``diffusers.DiffusionPipeline.from_pretrained``
        read it back. ``push_to_hub=True`` then uploads it (``push_kwargs``: repo_id, default the
        folder's name, token, private, commit_message, create_pr). safe_serialization=False and
        a variant are refused."""
        push = save_options(safe_serialization, variant, push_to_hub, **push_kwargs)
        folder = save_pretrained(folder, {"addp": self.net, "tokenizer": self.tokenizer})
        if push is not None:
            upload(folder, **push)
        return folder

    @property
    def components(self) -> dict[str, nn.Module]:
        """The pipeline's modules by argument name: ``ADDPPipeline(**pipe.components)`` shares them."""
        return {"net": self.net, "tokenizer": self.tokenizer}

    def enable_model_cpu_offload(self, *args, **kwargs):
        """Refused: the sampler runs the network and the tokenizer at every step."""
        raise AddpError("enable_model_cpu_offload is not supported: every step runs both the ADDP network and the "
                        "tokenizer, so both would move every step; pipe.to(dtype=torch.bfloat16) halves the memory")

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options of the bar ``progress=True`` shows: those of `addp.runs.progress.Progress`
        (desc, unit, disable, file, interval, mode)."""
        unknown = sorted(set(kwargs) - {"desc", "unit", "disable", "file", "interval", "mode"})
        if unknown:
            raise AddpError(f"set_progress_bar_config takes desc, unit, disable, file, interval and mode, "
                            f"not {unknown[0]!r}")
        self._progress_bar_config = dict(kwargs)

    def progress_bar(self, iterable=None, total: Optional[int] = None) -> Progress:
        """A progress bar over ``iterable`` or to ``total``, with ``set_progress_bar_config``'s options."""
        if iterable is None and total is None:
            raise AddpError("progress_bar needs an iterable or a total")
        return Progress(iterable, total=total, **{"desc": "generating", "unit": "img", **self._progress_bar_config})

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @property
    def image_size(self) -> int:
        return self.net.config.image_size

    def to(self, *args, device=None, dtype=None) -> "ADDPPipeline":
        """Move and/or cast both networks: ``pipe.to("cuda")``, ``pipe.to("cuda", torch.bfloat16)``,
        ``pipe.to(dtype=torch.bfloat16)``. Returns the pipeline."""
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        device = None if device is None else check_device(device)
        for module in (self.net, self.tokenizer):
            module.to(device=device, dtype=dtype)
        clear_cache(self.net)  # compiled parts and CUDA graphs read the old parameters
        return self

    def _step_callback(self, callback_on_step_end) -> Optional[StepCallback]:
        """diffusers' ``callback_on_step_end(pipe, step, timestep, callback_kwargs)`` as a sampler step callback."""
        if callback_on_step_end is None:
            return None
        return lambda i, step, state: callback_on_step_end(self, i, step.timestep, state)

    # -- unconditional generation ---------------------------------------------------------
    @torch.no_grad()
    def __call__(self, batch_size: Optional[int] = None, num_inference_steps: Optional[int] = None,
                 generator: Generators = None, output_type: str = "pil", return_dict: bool = True,
                 callback_on_step_end: Optional[Callable] = None, *, num_images: Optional[int] = None,
                 max_batch_size: Optional[int] = None, config: Optional[SamplerConfig] = None,
                 protocol: Optional[str] = None, schedule: Optional[str] = None, temperature: Optional[float] = None,
                 temperature_schedule: Optional[str] = None, top_p: Optional[float] = None,
                 parity: Optional[bool] = None, progress: bool = False,
                 cuda_graph: Optional[bool] = None, compile: bool = False, precision: Optional[str] = None):
        """Generate ``batch_size`` images.

        Args:
            batch_size: the number of images (default 16), as in diffusers' unconditional
                pipelines; ``num_images`` is the same number. Both given with
                ``batch_size < num_images`` takes ``batch_size`` as ``max_batch_size``, with a
                FutureWarning; other differing pairs are refused.
            num_inference_steps: denoising steps T (default 20, or the protocol's).
            generator: a torch.Generator on any device (the noise is drawn there and moved to
                the model's), a list of ``batch_size`` of them (image i has the tokens, and
                up to the float rounding of batched kernels the pixels, of
                ``pipe(1, generator=generators[i])``), or None (torch's global RNG).
            output_type: "pil" (a list of PIL images), "np" ((N, H, W, 3) float32 array) or
                "pt" ((N, 3, H, W) float tensor on the model's device), values in [0, 1].
            return_dict: True returns an ``ADDPPipelineOutput`` (``.images``), False the
                tuple ``(images,)``.
            callback_on_step_end: ``f(pipe, step, timestep, callback_kwargs)`` after every
                step (step counts from 0, timestep counts down to 0 at the last step);
                ``callback_kwargs`` holds the step's "image" (B, 3, H, W), "ids" (B, L) and
                "mask" (B, L, True = unreliable); returning a dict replaces any of them for
                the next step (a mask must keep its number of unreliable positions per row).
            config: every sampler option as one ``addp.sampling.SamplerConfig`` (what the
                commands pass), or
            protocol: a named official setting of ``addp.sampling.SAMPLER_PROTOCOLS``
                ("paper-steps20", "paper-steps256" = the paper's FID protocol); not both.
            num_inference_steps, schedule, temperature, temperature_schedule, top_p, parity:
                sampler options; those given replace the config's or the protocol's.
            max_batch_size: images per forward pass (default: all at once); the callback sees
                each forward pass's steps in turn.
            progress: show a bar over the images (``progress_bar``, set up by
                ``set_progress_bar_config``).
            cuda_graph, compile: as ``addp.sampling.generate`` (on a GPU each batch replays a
                captured CUDA graph unless a callback or a list of generators needs the eager loop).
            precision: "auto", "fp32", "bf16" or "fp16", as the commands' --precision (the
                same resolution); None runs under the caller's autocast context, if any.
        """
        check_output_type(output_type)
        count, chunk = image_counts(batch_size, num_images, max_batch_size)
        images = generate(self.net, self.tokenizer, count, generator=generator, batch_size=chunk,
                            progress=self.progress_bar if progress else False, cuda_graph=cuda_graph, compile=compile,
                            callback=self._step_callback(callback_on_step_end), config=config, protocol=protocol,
                            steps=num_inference_steps, schedule=schedule, temperature=temperature,
                            temperature_schedule=temperature_schedule, top_p=top_p, parity=parity,
                            precision=precision)
        images = as_output_type(images, output_type)
        return ADDPPipelineOutput(images) if return_dict else (images,)

    # -- inpainting -----------------------------------------------------------------------
    @torch.no_grad()
    def inpaint(self, image: ImageLike, mask_image, num_inference_steps: Optional[int] = None,
                generator: Generators = None, callback_on_step_end: Optional[Callable] = None, *,
                config: Optional[SamplerConfig] = None, protocol: Optional[str] = None, schedule: Optional[str] = None,
                temperature: Optional[float] = None, temperature_schedule: Optional[str] = None,
                top_p: Optional[float] = None, parity: Optional[bool] = None, precision: Optional[str] = None):
        """Fill the hole of ``image`` (``mask_image`` True / white) and return the image, of the
        same kind and size as the input (PIL for PIL or a path, a tensor for a tensor); pixels
        outside the hole are returned unchanged.

        Images of another size than the model's are resized to it for the model and the
        result is resized back before blending. One mask for every image of a batch; a list
        of generators holds one per image. The other arguments are those of ``__call__``.
        """
        config = sampler_config(config, protocol, steps=num_inference_steps, schedule=schedule,
                                  temperature=temperature, temperature_schedule=temperature_schedule,
                                  top_p=top_p, parity=parity)
        x, was_pil = _image_tensor(image)
        hole = mask_tensor(mask_image)
        if tuple(hole.shape[-2:]) != tuple(x.shape[-2:]):
            raise AddpError(f"mask size {tuple(hole.shape[-2:])} differs from image size {tuple(x.shape[-2:])}")
        if hole.shape[0] not in (1, x.shape[0]) or (hole.shape[0] > 1 and not (hole == hole[:1]).all()):
            raise AddpError("inpaint takes one mask for every image of a batch")
        hole = hole[:1]
        if not hole.any():
            raise AddpError("the mask is all black: there is no hole to fill")
        if hole.all():
            raise AddpError("the mask is all white: no pixel is known (use the pipeline's __call__ to generate)")
        check_generators(generator, x.shape[0])
        filled = self._inpaint_model_size(x.to(self.device), hole.to(self.device), config, generator,
                                          self._step_callback(callback_on_step_end), precision)
        out = torch.where(hole.to(self.device), filled, x.to(self.device))  # known pixels: the input, exactly
        return _like(out, image, was_pil)

    def _inpaint_model_size(self, x, hole, config, generator, callback, precision) -> torch.Tensor:
        """(B, 3, H, W), hole (1, 1, H, W) -> generated images (B, 3, H, W), not yet blended."""
        size = (self.image_size, self.image_size)
        H, W = x.shape[-2:]
        xs = resize_images(x, size)
        # resized: a model pixel is in the hole when it overlaps any hole pixel
        holes = hole if (H, W) == size else F.adaptive_max_pool2d(hole.float(), size) > 0
        images = self.fill(xs, holes.expand(x.shape[0], -1, -1, -1), config, generator, callback, precision)
        return resize_images(images.float(), (H, W))

    def fill(self, x: torch.Tensor, hole: torch.Tensor, config: SamplerConfig = SamplerConfig(),
             generator: Generators = None, callback: Optional[StepCallback] = None,
             precision: Optional[str] = None) -> torch.Tensor:
        """The alternating process from a partly known image, at the model size.

        x (B, 3, S, S) in [0, 1]; hole (B, 1, S, S) bool, the same in every row.
        Returns the generated images (B, 3, S, S) (not blended). ``callback``: see ``addp.sampling.denoise``.
        """
        with eval_mode(self.net, self.tokenizer), precision_context(precision, self.device):
            visible = (~hole).float()
            mean = (x * visible).sum((2, 3), keepdim=True) / visible.sum((2, 3), keepdim=True).clamp_min(1)
            x = torch.where(hole, mean.expand_as(x), x)  # (B, 3, S, S): the hole holds the visible mean
            ids = self.tokenizer.encode(x.to(self.tokenizer.codebook.dtype))  # (B, L)
            cell = self.image_size // self.net.config.grid_size
            mask = F.max_pool2d(hole.float(), cell).flatten(1) > 0  # (B, L): token cells touching the hole
            steps = Schedule(config, self.net.config.num_patches).plan(unreliable=int(mask[0].sum()))
            x = self.tokenizer.decode_ids(ids).clamp(0, 1)  # (B, 3, S, S): the decoded starting image
            x, _, _ = denoise(self.net, self.tokenizer, x, ids, mask, steps, config.top_p, generator, callback)
        return check_finite_images(x)

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
        if max(margins) > MAX_MARGIN:
            raise AddpError(f"margins must be at most {MAX_MARGIN} pixels, got left={left} right={right} "
                            f"top={top} bottom={bottom}")
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
        size = self.image_size
        H, W = x.shape[-2:]
        fit = size / scale / max(H, W)  # the image's longer side takes 1/scale of the canvas
        h, w = max(1, round(H * fit)), max(1, round(W * fit))
        t, l = (size - h) // 2, (size - w) // 2
        canvas = torch.zeros(x.shape[0], 3, size, size)
        canvas[..., t:t + h, l:l + w] = resize_images(x, (h, w))
        hole = torch.ones(1, 1, size, size, dtype=torch.bool)
        hole[..., t:t + h, l:l + w] = False
        return _like(self.inpaint(canvas, hole, **kwargs), image, was_pil)
