"""`python -m addp.generate`: sample images with the alternating denoising process.

Writes to --output-dir: numbered PNGs (000000.png, ...), grid.png (the first 64), samples.npz
(uint8 N x H x W x 3 under "arr_0", the input of FID tools) and generate.json (the settings,
keyed on the checkpoint's SHA-256, and which files are ours).

Resumable and shardable: images are made in batches of --batch-size, and batch b always draws
from its own generator seeded by (--seed, b) and always samples a full batch, so image i
depends only on (checkpoint, settings, seed, batch size, i) — never on how many images were
made before, how many are asked for now, or how many processes make them. Under
`torchrun --nproc_per_node=N -m addp.generate` the ranks share out the batches not yet on
disk; rank 0 holds the folder's lock and writes the grid, samples.npz and the summary.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from PIL import Image

from .cli import (ArgumentParser, add_checkpoint_args, add_runtime_args, add_sampler_args, output_folder,
                  positive_int, run_command, sampler_summary)
from .runtime.distributed import DistInfo, init_distributed
from .errors import AddpError
from .runs.images import save_png
from .runs.files import atomic_write, sha256_file, make_folder, probe_writable
from .runs.lock import FolderLock
from .runs.npz_stream import NpzImageWriter
from .runs.progress import Progress
from .sampling.image_io import to_uint8
from .sampling.pipeline import ADDPPipeline
from .runtime.precision import autocast, resolve_precision
from .models.registry import build_model

GRID_IMAGES = 64
RECORD = "generate.json"
OUTPUTS = ("grid.png", "samples.npz")
# what decides the images; a folder holds images of one setting only
SETTINGS = ("checkpoint_sha256", "tokenizer_sha256", "random_init", "steps", "schedule", "temperature",
            "temperature_schedule", "top_p", "parity", "seed", "batch_size", "precision")
# settings added later: what older generate.json files used
SETTING_DEFAULTS = {"precision": "fp32", "temperature_schedule": "annealed", "parity": False}
_IMAGE_NAME = re.compile(r"\d{6,}\.png")
_OUR_TMP = re.compile(r"\.(\d{6,}\.png|grid\.png|samples\.npz|generate\.json)\..*\.tmp")


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser("generate", description=__doc__.split("\n\n")[0])
    add_checkpoint_args(p)
    p.add_argument("--random-init", action="store_true",
                   help="baseline: a freshly initialised network of the checkpoint's config (same tokenizer)")
    p.add_argument("--num-images", type=positive_int, default=64)
    p.add_argument("--batch-size", type=positive_int, default=32, help="fixes the batch boundaries (and so the images)")
    p.add_argument("--output-dir", type=output_folder, default="output/generate")
    p.add_argument("--overwrite", action="store_true", help="start over in a folder made with other settings")
    add_sampler_args(p)
    add_runtime_args(p)
    return p


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of batch ``batch_index``'s generator (distinct for every (seed, batch))."""
    return (seed * 1_000_003 + batch_index) % (2 ** 63)


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def batch_range(b: int, batch_size: int, num_images: int) -> range:
    return range(b * batch_size, min((b + 1) * batch_size, num_images))


# --------------------------------------------------------------------------- the folder (rank 0)
def checkpoint_hashes(checkpoint: str, tokenizer: str | None) -> dict:
    """SHA-256 of the files the networks are loaded from (a folder: its addp.safetensors and
    tokenizer.safetensors), so a checkpoint replaced at the same path is another setting."""
    path = Path(checkpoint)
    if not path.exists():
        raise AddpError(f"checkpoint not found: {checkpoint}")
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


def _check_writable(out: Path) -> None:
    make_folder(out)
    probe_writable(out)  # a file of our own, never through a link planted in the folder


def _read_record(out: Path) -> dict | None:
    path = out / RECORD
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):
        raise AddpError(f"{path} is not a generate.json written by addp.generate; use another --output-dir")
    return record


def _our_files(out: Path, record: dict | None) -> set[str]:
    """The files of ``out`` that ``record`` (our generate.json) says we wrote."""
    if record is None:
        return set()
    claimed = int(record.get("images", 0))
    return {image_name(i) for i in range(claimed)} | set(record.get("outputs", ())) & set(OUTPUTS)


def _foreign_files(out: Path, ours: set[str], num_images: int) -> list[str]:
    """Files this run would read or replace that are not ours: numbered PNGs below
    ``num_images``, grid.png and samples.npz."""
    names = [f.name for f in out.iterdir() if _IMAGE_NAME.fullmatch(f.name) and int(f.stem) < num_images]
    names += [n for n in OUTPUTS if (out / n).exists()]
    return sorted(n for n in names if n not in ours)


def prepare_folder(out: Path, settings: dict, num_images: int, overwrite: bool) -> dict | None:
    """Check that ``out`` may take this run's images; returns the existing record."""
    record = _read_record(out)
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
    _write_record(out, {**settings, "images": claimed, "outputs": record.get("outputs", []) if record else []})


def _write_record(out: Path, record: dict) -> None:
    atomic_write(out / RECORD, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))


def batches_to_make(out: Path, num_images: int, batch_size: int) -> list[int]:
    """The batches with at least one PNG missing."""
    have = {f.name for f in out.iterdir()}
    return [b for b in range(-(-num_images // batch_size))
            if not all(image_name(i) in have for i in batch_range(b, batch_size, num_images))]


# --------------------------------------------------------------------------- ranks
def _on_rank0(fn, dist: DistInfo):
    """``fn()`` run by rank 0, its result returned on every rank. Its error is raised on rank
    0 (one `error:` line) while the other ranks leave quietly with the same exit code."""
    value = None
    if dist.is_main:
        try:
            value = fn()
        except (AddpError, OSError) as e:
            value = e
    if dist.enabled:
        box = [AddpError(str(value)) if isinstance(value, Exception) else value]
        torch_dist.broadcast_object_list(box, src=0)
        value = box[0]
    if isinstance(value, Exception):
        if dist.is_main:
            raise value
        raise SystemExit(2)
    return value


def _sum_over_ranks(n: int, dist: DistInfo) -> int:
    if not dist.enabled:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=dist.device)
    torch_dist.all_reduce(t)
    return int(t.item())


def _load_pipeline(args, device) -> ADDPPipeline:
    pipe = ADDPPipeline.from_pretrained(args.checkpoint, tokenizer=args.tokenizer, device=device)
    if args.random_init:
        torch.manual_seed(args.seed)
        pipe = ADDPPipeline(build_model(pipe.net.config).to(pipe.device), pipe.tokenizer)
    return pipe


def main(args) -> dict:
    config = args.sampler_config
    out, N, B = Path(args.output_dir), args.num_images, args.batch_size
    dist = init_distributed(args.device)
    lock = FolderLock(out) if dist.is_main else None
    try:
        return _generate(args, config, out, N, B, dist, lock)
    finally:
        if lock is not None:
            lock.release()


def _generate(args, config, out: Path, N: int, B: int, dist: DistInfo, lock: FolderLock | None) -> dict:
    def check_folder():
        _check_writable(out)
        lock.acquire()
        values = {**vars(args), **dataclasses.asdict(config)}
        settings = {k: values[k] for k in SETTINGS if k in values}
        settings.update(checkpoint_hashes(args.checkpoint, args.tokenizer), checkpoint=str(Path(args.checkpoint)))
        settings["precision"] = resolve_precision(args.precision, dist.device)  # what made the images
        return settings, prepare_folder(out, settings, N, args.overwrite)

    settings, record = _on_rank0(check_folder, dist)
    pipe = _load_pipeline(args, dist.device)

    def claim_and_list():
        record_settings(out, settings, record, N, args.overwrite)
        return batches_to_make(out, N, B)

    todo = _on_rank0(claim_and_list, dist)
    made = _make_batches(args, config, pipe, out, N, B, todo, dist)
    if not dist.is_main:
        return {}
    write_outputs(out, N)
    _write_record(out, {**_read_record(out), "outputs": list(OUTPUTS)})
    return {"output_dir": str(out), "num_images": N, "generated_now": made, "skipped": N - made,
            "processes": dist.world_size, "npz": str(out / "samples.npz"), "grid": str(out / "grid.png"),
            "seed": args.seed, **sampler_summary(args)}


def _make_batches(args, config, pipe, out: Path, N: int, B: int, todo: list[int], dist: DistInfo) -> int:
    """Rank r makes batches todo[r], todo[r + world], ...; the ranks meet after every round so
    that rank 0's bar counts everyone's images. Returns the number of PNGs written."""
    rounds = -(-len(todo) // dist.world_size)
    done_before = N - sum(len(batch_range(b, B, N)) for b in todo)
    made = 0
    with Progress(total=N, initial=done_before, desc="generating", unit="img", disable=not dist.is_main) as bar:
        for r in range(rounds):
            k = r * dist.world_size + dist.rank
            written = 0
            if k < len(todo):
                written = _make_batch(args, config, pipe, out, N, B, todo[k])
            written = _sum_over_ranks(written, dist)
            made += written
            bar.update(sum(len(batch_range(b, B, N)) for b in todo[r * dist.world_size:(r + 1) * dist.world_size]))
    return made


def _make_batch(args, config, pipe, out: Path, N: int, B: int, b: int) -> int:
    indices = batch_range(b, B, N)
    todo = [i for i in indices if not (out / image_name(i)).exists()]
    g = torch.Generator(pipe.device).manual_seed(batch_seed(args.seed, b))
    with autocast(args.precision, pipe.device):
        images = pipe(num_images=B, generator=g, output_type="pt", cuda_graph=args.cuda_graph,
                      compile=args.compile, config=config).images
    arr = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    for i in todo:
        save_png(out / image_name(i), arr[i - indices.start])
    return len(todo)


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


def cli(argv=None) -> int:
    return run_command("generate", get_args_parser(), main, argv,
                       interrupted="the images written so far are kept; run the same command again to resume")


if __name__ == "__main__":
    sys.exit(cli())
