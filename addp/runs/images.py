"""Reading image files: the one decoder behind training folders and single inputs.

`open_image(path)` returns a fully loaded 8-bit PIL image (its mode as decoded for 8-bit
files). Files that would make the reader unsafe or wrong are handled here once:
- decompression bombs (more pixels than `PIL.Image.MAX_IMAGE_PIXELS`, about 89.5 M) are
  refused before any pixel is decoded;
- 16-bit integer (`I;16*`, `I`) and float (`F`) images are scaled to 8 bits from their own
  range (65535 and 1.0), where `convert("RGB")` would clip them to white or black;
- any other decoding failure (truncated, corrupt, not an image) becomes one `UnreadableImage`.
`image_header(path)` reads the size, mode and format alone, with the same refusals, for
readers that check a whole data set when it is loaded.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
from PIL import Image

from ..errors import AddpError, first_line
from .files import atomic_write

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class UnreadableImage(AddpError):
    pass


def open_image(path: str | os.PathLike, eight_bit: bool = True) -> Image.Image:
    """The image at `path`, decoded and scaled to 8 bits per channel (`eight_bit=False`: with
    its values as stored, for label maps); raises `UnreadableImage`."""
    with _decoding(path):
        with Image.open(path) as im:
            im.load()
            scaled = to_8bit(im, path) if eight_bit else im
            return im.copy() if scaled is im else scaled


def image_header(path: str | os.PathLike) -> tuple[int, int, str, str]:
    """(width, height, mode, format) of the image at `path` from its header alone, with
    `open_image`'s refusal of decompression bombs; raises `UnreadableImage`."""
    with _decoding(path):
        with Image.open(path) as im:
            return im.width, im.height, im.mode, im.format


@contextlib.contextmanager
def _decoding(path):
    """Any failure to open or decode `path` as one `UnreadableImage` naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except FileNotFoundError:
        raise UnreadableImage(f"image not found: {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UnreadableImage(f"{path} is refused as a possible decompression bomb ({first_line(e)})") from None
    except UnreadableImage:
        raise
    except Exception as e:  # PIL's plugins raise OSError, ValueError, SyntaxError, struct.error, ...
        raise UnreadableImage(f"{path} is not a readable image ({first_line(e)})") from None


def to_8bit(im: Image.Image, source="image") -> Image.Image:
    """`im` in 8 bits: high bit-depth grey images rescaled to a new "L" image, others returned as they are."""
    if im.mode in SIXTEEN_BIT_MODES:
        return _grey(np.asarray(im, dtype=np.float64) / 65535)
    if im.mode == "I":
        arr = np.asarray(im, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise UnreadableImage(f"{source}: 32-bit integer pixels outside 0..65535 have no known scale")
        return _grey(arr / 65535)
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise UnreadableImage(f"{source}: float pixels hold NaN or Inf")
        return _grey(arr)  # float images are in [0, 1]; values outside are clipped
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """An 8-bit RGB version of any PIL image (high bit-depth modes rescaled first)."""
    im = to_8bit(im)
    return im if im.mode == "RGB" else im.convert("RGB")


def read_rgb(path: str | os.PathLike) -> Image.Image:
    return to_rgb(open_image(path))


def _grey(unit: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(unit, 0, 1) * 255).round().astype(np.uint8))


def save_png(path, image) -> None:
    """Write a PIL image or an (H, W[, 3]) uint8 array as a PNG, atomically."""
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
