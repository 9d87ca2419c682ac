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
import sys
from pathlib import Path

import torch
import torch.distributed as torch_dist

from .cli import (ArgumentParser, add_checkpoint_args, add_runtime_args, add_sampler_args, output_folder,
                  positive_int, run_command, sampler_summary)
from .runtime.distributed import DistInfo, init_distributed
from .errors import AddpError
from .runs.images import save_png
from .runs.samples_folder import (OUTPUTS, SETTINGS, batch_range, batches_to_make, check_writable, checkpoint_hashes,
                                  image_name, prepare_folder, read_settings_record, record_settings, write_outputs,
                                  write_settings_record)
from .runs.lock import FolderLock
from .runs.progress import Progress
from .sampling.image_io import to_uint8
from .sampling.pipeline import ADDPPipeline
from .runtime.precision import resolve_precision
from .runtime.seeds import batch_seed
from .runtime.tuning import tune_for_device
from .models.registry import build_model


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
    add_runtime_args(p, compile="the ADDP network and the tokenizer's decoder (pays off for many batches)", cuda_graph=True)
    return p


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
    tune_for_device(dist.device)
    args.precision = resolve_precision(args.precision, dist.device)  # once per run; recorded with the images
    lock = FolderLock(out) if dist.is_main else None
    try:
        return _generate(args, config, out, N, B, dist, lock)
    finally:
        if lock is not None:
            lock.release()


def _generate(args, config, out: Path, N: int, B: int, dist: DistInfo, lock: FolderLock | None) -> dict:
    def check_folder():
        check_writable(out)
        lock.acquire()
        values = {**vars(args), **dataclasses.asdict(config)}
        settings = {k: values[k] for k in SETTINGS if k in values}
        settings.update(checkpoint_hashes(args.checkpoint, args.tokenizer), checkpoint=str(Path(args.checkpoint)))
        settings["precision"] = args.precision
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
    write_settings_record(out, {**read_settings_record(out), "outputs": list(OUTPUTS)})
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
    images = pipe(batch_size=B, generator=g, output_type="pt", cuda_graph=args.cuda_graph,
                  compile=args.compile, config=config, precision=args.precision).images
    arr = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    for i in todo:
        save_png(out / image_name(i), arr[i - indices.start])
    return len(todo)


def cli(argv=None) -> int:
    return run_command("generate", get_args_parser(), main, argv,
                       interrupted="the images written so far are kept; run the same command again to resume")


if __name__ == "__main__":
    sys.exit(cli())
