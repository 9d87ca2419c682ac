"""samples.npz without holding the images: written one image at a time, read one at a time.

The file is what ``np.savez(path, arr_0=images)`` makes (an uncompressed zip holding
``arr_0.npy``), so ``np.load(path)["arr_0"]`` and every FID tool read it; its zip entry carries
a fixed timestamp, so the same images always give the same bytes.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

MEMBER = "arr_0.npy"
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry


class NpzImageWriter:
    """Write uint8 (N, H, W, 3) images in order into an .npz, never more than one in memory."""

    def __init__(self, path, num_images: int, height: int, width: int):
        self.shape = (num_images, height, width, 3)
        self.written = 0
        self._zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        info = zipfile.ZipInfo(MEMBER, date_time=_FIXED_TIME)
        info.compress_type = zipfile.ZIP_STORED
        self._member = self._zip.open(info, "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._member, header)

    def write(self, image: np.ndarray) -> None:
        if image.shape != self.shape[1:] or image.dtype != np.uint8:
            raise ValueError(f"image {self.written} is {image.dtype} {image.shape}, expected uint8 {self.shape[1:]}")
        if self.written == self.shape[0]:
            raise ValueError(f"more than the {self.shape[0]} images announced")
        self._member.write(np.ascontiguousarray(image).tobytes())
        self.written += 1

    def close(self) -> None:
        if self.written != self.shape[0]:
            raise ValueError(f"{self.written} images written, {self.shape[0]} announced")
        self._member.close()
        self._zip.close()

    def abort(self) -> None:
        self._zip.fp.close()  # the caller removes the unfinished file


class NpzImageReader:
    """Random access to the images of ``arr_0`` in an .npz without loading the array.

    Reads one image per call (forward reads are cheap; a compressed member rewinds on a
    backward seek). Opens the file lazily so that each process of a data loader has its own.
    """

    def __init__(self, path):
        self.path = Path(path)
        with zipfile.ZipFile(self.path) as z:
            if MEMBER not in z.namelist():
                raise ValueError(f"no '{MEMBER[:-4]}' array (it holds: {', '.join(n[:-4] for n in z.namelist())})")
            with z.open(MEMBER) as f:
                self.shape, dtype, self._offset = _read_header(f)
        if len(self.shape) != 4 or self.shape[-1] != 3 or dtype != np.uint8:
            raise ValueError(f"arr_0 must be uint8 (N, H, W, 3), got {dtype} {self.shape}")
        self._image_bytes = int(np.prod(self.shape[1:]))
        self._file = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self._file is None:
            self._zip = zipfile.ZipFile(self.path)
            self._file = self._zip.open(MEMBER)
        self._file.seek(self._offset + i * self._image_bytes)
        data = self._file.read(self._image_bytes)
        if len(data) != self._image_bytes:
            raise ValueError(f"{self.path} is truncated at image {i}")
        return np.frombuffer(data, dtype=np.uint8).reshape(self.shape[1:])

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_zip": None}


def _read_header(f):
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, fortran_order, dtype = read(f)
    if fortran_order:
        raise ValueError("arr_0 is stored in Fortran order")
    return shape, dtype, f.tell()
