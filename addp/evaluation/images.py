"""The images to score: a folder of images, a samples.npz or the bundled digits, streamed as
uint8 tensors, resized and centre-cropped to a size the way ADDP or ADM preprocess."""
from __future__ import annotations

import hashlib

import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import AddpError
from ..runs.images import read_rgb
from ..runs.npz_stream import NpzImageReader
from .reference_stats import files_identity


IMAGE_EXTS = (".png", ".jpg", ".jpeg")



PREPROCESS = ("addp", "adm")



def _tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class ImagesDataset(torch.utils.data.Dataset):
    """uint8 images (N, 3, H, W) held in memory (small sets: the digits, tensors from Python)."""

    def __init__(self, images: torch.Tensor, identity=None):
        self.images = images
        self.size = tuple(images.shape[-2:])
        self.identity = identity if identity is not None else ["tensor", _tensor_hash(images)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]



class FolderImages(torch.utils.data.Dataset):
    """Image files decoded one at a time -> uint8 (3, H, W).

    With ``preprocess`` every image is resized and centre-cropped to ``size`` (square);
    without, every image must already be ``size`` (that of the first when None).
    """

    def __init__(self, root: Path, files: list, size=None, preprocess: str | None = None):
        self.root, self.files, self.preprocess = root, files, preprocess
        self.size = (size, size) if isinstance(size, int) else size
        if self.size is None:
            self.size = self._decode(files[0]).shape[:2]
        self.identity = ["folder", files_identity(root, files)]

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, f: Path) -> np.ndarray:
        im = read_rgb(f)  # one-line error on a bad file or a decompression bomb
        if self.preprocess is not None:
            im = resize_center_crop(im, self.size[0], self.preprocess)
        return np.array(im)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self._decode(self.files[i])
        if tuple(image.shape[:2]) != tuple(self.size):
            raise AddpError(f"{self.files[i]} is {image.shape[1]}x{image.shape[0]}, "
                            f"the other images {self.size[1]}x{self.size[0]}")
        return torch.from_numpy(image).permute(2, 0, 1)



class NpzImages(torch.utils.data.Dataset):
    """The images of a samples .npz (arr_0, uint8 N x H x W x 3), read one at a time."""

    def __init__(self, path: Path):
        try:
            self.reader = NpzImageReader(path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise AddpError(f"{path} is not a readable samples .npz ({str(e) or type(e).__name__})") from None
        self.size = tuple(self.reader.shape[1:3])
        st = path.stat()
        self.identity = ["npz", st.st_size, st.st_mtime_ns]

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.reader[i].copy()).permute(2, 0, 1)



def resize_center_crop(im: Image.Image, size: int, preprocess: str) -> Image.Image:
    """The reference preparation of the official releases: the short side resized to ``size``
    then a centre crop. "addp": torchvision's Resize + CenterCrop (ADDP's
    prepare_imagenet_val.py); "adm": halvings with BOX while the short side is at least twice
    ``size``, then BICUBIC (ADM's center_crop_arr)."""
    if preprocess == "addp":
        from torchvision.transforms import functional as TF
        return TF.center_crop(TF.resize(im, size), size)
    while min(im.size) >= 2 * size:
        im = im.resize(tuple(x // 2 for x in im.size), resample=Image.BOX)
    scale = size / min(im.size)
    im = im.resize(tuple(round(x * scale) for x in im.size), resample=Image.BICUBIC)
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    return im.crop((left, top, left + size, top + size))



def list_images(folder: Path) -> list:
    """The numbered images of ``folder`` (000000.png ...) when it has any, else every image below it."""
    numbered = sorted(f for f in folder.iterdir()
                      if f.suffix.lower() in IMAGE_EXTS and re.fullmatch(r"\d+", f.stem) and f.is_file())
    if numbered:
        return numbered
    return sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file())



def open_images(source, size=None, preprocess: str | None = None) -> torch.utils.data.Dataset:
    """A folder, a samples .npz, "digits" or a uint8 (N, 3, H, W) tensor -> a dataset of uint8
    (3, H, W) images with ``.size`` (H, W) and ``.identity`` (what its cache key depends on)."""
    if isinstance(source, torch.Tensor):
        return ImagesDataset(source)
    if source == "digits":
        from ..training.data import load_digits
        return ImagesDataset((load_digits("heldout")[0] * 255).round().to(torch.uint8))
    path = Path(source)
    if not path.exists():
        raise AddpError(f"{source} does not exist (expected a folder of images, an .npz or 'digits')")
    if path.is_file():
        if path.suffix != ".npz":
            raise AddpError(f"{source} is not a folder, an .npz or 'digits'")
        images = NpzImages(path)
        if not len(images):
            raise AddpError(f"{source} holds no images (its arr_0 is empty)")
        return images
    files = list_images(path)
    if not files:
        raise AddpError(f"{source} holds no png/jpg images")
    return FolderImages(path, files, size, preprocess)



def load_images(source) -> torch.Tensor:
    """All images of ``source`` in memory as uint8 (N, 3, H, W): for small sets only."""
    ds = open_images(source)
    return torch.stack([ds[i] for i in range(len(ds))])
