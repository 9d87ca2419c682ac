"""diffusers' argument conventions on addp's pipelines: the keywords of ``from_pretrained`` and
``save_pretrained`` (each taken, or refused in one line; any other keyword is named in one
line) and the number of images of a call (``batch_size``, as in diffusers' unconditional
pipelines, with ``num_images`` as its alias and ``max_batch_size`` the images per forward pass).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch

from ..errors import AddpError

LOAD_KEYWORDS = ("torch_dtype", "variant", "use_safetensors", "token", "local_files_only", "cache_dir", "revision")
SAVE_KEYWORDS = ("safe_serialization", "variant", "push_to_hub")
PUSH_KEYWORDS = ("repo_id", "token", "private", "commit_message", "create_pr")
DEFAULT_NUM_IMAGES = 16
_PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


def refuse_unknown(what: str, unknown: dict, known: tuple[str, ...]) -> None:
    """One error line naming the first keyword of `unknown`, if any."""
    if unknown:
        raise AddpError(f"{what} takes no keyword argument {next(iter(unknown))!r} (diffusers' keywords it takes: "
                        f"{', '.join(known)})")


def check_torch_dtype(torch_dtype) -> Optional[torch.dtype]:
    if torch_dtype is None or (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
        return torch_dtype
    raise AddpError(f"torch_dtype must be a floating torch.dtype (e.g. torch.bfloat16), got {torch_dtype!r}")


def check_variant(variant) -> None:
    if variant is not None:
        raise AddpError(f"variant={variant!r}: addp folders hold one model.safetensors per component and no "
                        "variants; load it and cast with torch_dtype= instead")


def check_use_safetensors(use_safetensors, source=None) -> None:
    """`use_safetensors` None or True; True refuses a named PyTorch file (`source`)."""
    if use_safetensors is False:
        raise AddpError("use_safetensors=False: addp picks the reader by the file (safetensors, or an official "
                        ".pth through torch.load(weights_only=True)); leave it unset")
    if use_safetensors and source is not None and Path(str(source)).suffix in _PICKLE_SUFFIXES:
        raise AddpError(f"use_safetensors=True, but {source} is not a safetensors file")


def save_options(safe_serialization=True, variant=None, push_to_hub: bool = False, **kwargs) -> Optional[dict]:
    """The keywords of `addp.models.hub.upload` when `push_to_hub`, else None; one line for the rest."""
    if safe_serialization is not True:
        raise AddpError(f"safe_serialization={safe_serialization!r}: addp writes only safetensors files")
    check_variant(variant)
    if not push_to_hub:
        refuse_unknown("save_pretrained", kwargs, SAVE_KEYWORDS)
        return None
    refuse_unknown("save_pretrained(push_to_hub=True)", {k: v for k, v in kwargs.items() if k not in PUSH_KEYWORDS},
                   SAVE_KEYWORDS + PUSH_KEYWORDS)
    return kwargs


def image_counts(batch_size: Optional[int], num_images: Optional[int],
                 max_batch_size: Optional[int]) -> tuple[int, Optional[int]]:
    """(number of images, images per forward pass or None for all) of a pipeline call.

    ``batch_size`` and ``num_images`` both name the number of images. Both given with
    ``batch_size < num_images`` is the older call whose ``batch_size`` was the images per
    forward pass: it still means that, with a FutureWarning.
    """
    if batch_size is None or num_images is None or batch_size == num_images:
        count = next((n for n in (batch_size, num_images) if n is not None), DEFAULT_NUM_IMAGES)
        return count, max_batch_size
    if _is_count(batch_size) and _is_count(num_images) and batch_size < num_images and max_batch_size is None:
        warnings.warn(f"pipe(num_images={num_images}, batch_size={batch_size}): batch_size is the number of images "
                      f"(as in diffusers); pass max_batch_size={batch_size} for the images per forward pass",
                      FutureWarning, stacklevel=3)
        return num_images, batch_size
    raise AddpError(f"batch_size={batch_size!r} and num_images={num_images!r} differ: both name the number of "
                    "images (max_batch_size= sets the images per forward pass)")


def _is_count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1
