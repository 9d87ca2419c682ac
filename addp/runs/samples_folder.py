"""The samples folder of `addp.generate`: numbered PNGs, their record of settings (generate.json),
which images are still to make, what in the folder is ours, and the grid and .npz written at
the end. A folder made with other settings is refused unless told to start over."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import AddpError
from .files import atomic_write, sha256_file, sha256_path, make_folder, probe_writable
from .npz_stream import NpzImageWriter


GRID_IMAGES = 64



RECORD = "generate.json"
MODEL_INDEX = "model_index.json"  # marks a save_pretrained folder



OUTPUTS = ("grid.png", "samples.npz")



# what decides the images; a folder holds images of one setting only
SETTINGS = ("checkpoint_sha256", "tokenizer_sha256", "random_init", "steps", "schedule", "temperature",
            "temperature_schedule", "top_p", "parity", "seed", "batch_size", "precision")



# what a generate.json that does not record one of these settings stands for
SETTING_DEFAULTS = {"precision": "fp32", "temperature_schedule": "annealed", "parity": False}



_IMAGE_NAME = re.compile(r"\d{6,}\.png")



_OUR_TMP = re.compile(r"\.(\d{6,}\.png|grid\.png|samples\.npz|generate\.json)\..*\.tmp")



def image_name(index: int) -> str:
    return f"{index:06d}.png"



def batch_range(b: int, batch_size: int, num_images: int) -> range:
    return range(b * batch_size, min((b + 1) * batch_size, num_images))



# --------------------------------------------------------------------------- the folder (rank 0)
def checkpoint_hashes(checkpoint: str, tokenizer: str | None) -> dict:
    """SHA-256 of the files the networks are loaded from (a training run folder: its
    addp.safetensors and tokenizer.safetensors; a save_pretrained folder: every file in it), so
    a checkpoint replaced at the same path is another setting."""
    path = Path(checkpoint)
    if not path.exists():
        raise AddpError(f"checkpoint not found: {checkpoint}")
    if path.is_dir() and (path / MODEL_INDEX).exists():
        return {"checkpoint_sha256": sha256_path(path),
                "tokenizer_sha256": sha256_file(Path(tokenizer)) if tokenizer is not None else None}
    if path.is_dir():
        if tokenizer is None and (path / "tokenizer.safetensors").exists():
            tokenizer = path / "tokenizer.safetensors"
        path = path / "addp.safetensors"
        if not path.exists():
            raise AddpError(f"{checkpoint} holds no addp.safetensors")
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise AddpError(f"tokenizer checkpoint not found: {tokenizer}")
    return {"checkpoint_sha256": sha256_file(path),
            "tokenizer_sha256": sha256_file(Path(tokenizer)) if tokenizer is not None else None}



def check_writable(out: Path) -> None:
    make_folder(out)
    probe_writable(out)  # a file of our own, never through a link planted in the folder



def read_settings_record(out: Path) -> dict | None:
    path = out / RECORD
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = None
    if not _well_formed(record):
        raise AddpError(f"{path} is not a generate.json written by addp.generate; use another --output-dir")
    return record


def _well_formed(record) -> bool:
    """Whether a parsed generate.json has the shape this module writes (a count of claimed
    images, a list of output names)."""
    if not isinstance(record, dict):
        return False
    images, outputs = record.get("images", 0), record.get("outputs", [])
    count_ok = isinstance(images, int) and not isinstance(images, bool) and images >= 0
    return count_ok and isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)



def _our_files(out: Path, record: dict | None) -> set[str]:
    """The files of ``out`` that ``record`` (our generate.json) says we wrote."""
    if record is None:
        return set()
    claimed, outputs = record.get("images", 0), set(record.get("outputs", ())) & set(OUTPUTS)
    return {f.name for f in out.iterdir()
            if (_IMAGE_NAME.fullmatch(f.name) and int(f.stem) < claimed) or f.name in outputs}



def _foreign_files(out: Path, ours: set[str], num_images: int) -> list[str]:
    """Files this run would read or replace that are not ours: numbered PNGs below
    ``num_images``, grid.png and samples.npz."""
    names = [f.name for f in out.iterdir() if _IMAGE_NAME.fullmatch(f.name) and int(f.stem) < num_images]
    names += [n for n in OUTPUTS if (out / n).exists()]
    return sorted(n for n in names if n not in ours)



def prepare_folder(out: Path, settings: dict, num_images: int, overwrite: bool) -> dict | None:
    """Check that ``out`` may take this run's images; returns the existing record."""
    record = read_settings_record(out)
    if record is not None and not overwrite:
        diff = sorted(k for k in SETTINGS if record.get(k, SETTING_DEFAULTS.get(k)) != settings.get(k))
        if diff:
            raise AddpError(f"{out} holds images made with other settings ({', '.join(diff)}); "
                            f"use another --output-dir or --overwrite")
    foreign = _foreign_files(out, _our_files(out, record), num_images)
    if foreign:
        raise AddpError(f"{out} holds {len(foreign)} file(s) addp.generate did not write (e.g. {foreign[0]}); "
                        f"they are neither used nor deleted: use another --output-dir")
    return record



def record_settings(out: Path, settings: dict, record: dict | None, num_images: int, overwrite: bool) -> None:
    """Write generate.json claiming images 0..num_images-1; --overwrite first deletes our files."""
    if overwrite and record is not None:
        for name in _our_files(out, record):
            (out / name).unlink(missing_ok=True)
        record = None
    for f in out.iterdir():  # temporary files of an earlier run of ours that was killed
        if _OUR_TMP.fullmatch(f.name):
            f.unlink(missing_ok=True)
    claimed = max(num_images, int(record.get("images", 0)) if record else 0)
    write_settings_record(out, {**settings, "images": claimed, "outputs": record.get("outputs", []) if record else []})



def write_settings_record(out: Path, record: dict) -> None:
    atomic_write(out / RECORD, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))



def batches_to_make(out: Path, num_images: int, batch_size: int) -> list[int]:
    """The batches with at least one PNG missing."""
    have = {f.name for f in out.iterdir()}
    return [b for b in range(-(-num_images // batch_size))
            if not all(image_name(i) in have for i in batch_range(b, batch_size, num_images))]



def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))



def write_outputs(out: Path, N: int) -> None:
    """samples.npz from the PNGs on disk, one image in memory at a time, and the grid."""
    first = _read_png(out / image_name(0))
    grid_images = []

    def write_npz(tmp):
        writer = NpzImageWriter(tmp, N, *first.shape[:2])
        try:
            for i in range(N):
                image = first if i == 0 else _read_png(out / image_name(i))
                if image.shape != first.shape:
                    raise AddpError(f"{out / image_name(i)} is {image.shape[1]}x{image.shape[0]}, "
                                    f"the others {first.shape[1]}x{first.shape[0]}")
                writer.write(image)
                if i < GRID_IMAGES:
                    grid_images.append(image)
            writer.close()
        except BaseException:
            writer.abort()
            raise

    atomic_write(out / "samples.npz", write_npz)
    grid = _grid(np.stack(grid_images))
    atomic_write(out / "grid.png", lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))



def _grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """(n, H, W, 3) uint8 -> one image, ceil(sqrt(n)) columns, ``pad`` px of black between."""
    n, H, W, _ = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    grid = np.zeros((rows * (H + pad) + pad, cols * (W + pad) + pad, 3), dtype=np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, cols)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = image
    return grid
