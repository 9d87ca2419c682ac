"""`python -m addp.segment`: semantic segmentation (UperNet) on an ADDP encoder, trained and
evaluated with mIoU / pixel accuracy.

With no `--data-path` it builds the digits canvases (`addp.dense.canvas`) and runs on them
(11 classes: background and the ten digits); with `--data-path root` it reads an ADE20k root
(`images/{training,validation}`, `annotations/...` PNGs, 0 ignored; `--num-classes`, 150 for
ADE20k). Evaluation is whole-image, or sliding `--input-size` windows when an image is larger.
Runs on `trainer.Trainer` (DDP under torchrun or srun, atomic checkpoints, exact resume); writes
`segmenter.safetensors`, `checkpoint-{best,last}`, `log.jsonl`, `report.json` and
`predictions.png` to `--output-dir`.
"""
from __future__ import annotations

import logging
import sys
import time

import torch
import torch.distributed
import torch.nn.functional as F

from .training import finetune_engine as engine
from .models.checkpoint import save_checkpoint
from .cli import RESUMABLE, ArgumentParser, positive_int, run_command
from .dense import recipes as _dense_recipes  # noqa: F401  (registers the Tab. 19 recipes)
from .dense import training as dense
from .dense.ade import AdeSegmentation
from .dense.metrics import confusion, segmentation_metrics
from .dense.canvas import CLASSES as CANVAS_CLASSES
from .dense.pictures import draw_segmentation
from .dense.segmentation import SegmentationObjective, Segmenter, SegmenterConfig, predict
from .runs.files import write_json
from .runtime.distributed import DistInfo
from .training import recipes

log = logging.getLogger("addp.segment")  # a fixed name: run as `python -m`, __name__ is "__main__"


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser("segment", description=__doc__.split("\n\n")[0])
    dense.add_dense_args(p, "segment", steps=600, blr=1e-2, layer_decay=0.85)
    p.add_argument("--num-classes", type=positive_int, default=None, help="default: 11 on the canvases, 150 else")
    return p


def padded_predict(model: Segmenter, image: torch.Tensor, crop: int) -> torch.Tensor:
    """(3, H, W) -> class map (H, W): padded to a multiple of the patch and 32, then `predict`."""
    H, W = image.shape[1:]
    ph, pw = -H % 32, -W % 32
    scores = predict(model, F.pad(image, (0, pw, 0, ph)), crop)
    return scores[:, :H, :W].argmax(0)


@torch.no_grad()
def evaluate(model: Segmenter, dataset: AdeSegmentation, crop: int, dist: DistInfo) -> dict:
    """mIoU, aAcc, mAcc (%) over `dataset`, sharded over the processes of `dist` (confusion summed)."""
    device, k = next(model.parameters()).device, model.config.num_classes
    matrix = torch.zeros(k, k, dtype=torch.int64, device=device)
    for i in range(dist.rank, len(dataset), dist.world_size):
        image, labels, _ = dataset[i]
        matrix += confusion(padded_predict(model, image.to(device), crop), labels.to(device), k)
    if dist.world_size > 1:
        torch.distributed.all_reduce(matrix)
    return segmentation_metrics(matrix.cpu())


def main(args) -> dict:
    with engine.start_run(args, "segment") as run:
        return _segment(args, run)


def _segment(args, run: engine.Run) -> dict:
    dist, out = run.dist, run.out
    root = dense.data_root(args, dist, "ade")
    canvases = not args.data_path
    args.input_size = args.input_size or (96 if canvases else 512)
    num_classes = args.num_classes or (11 if canvases else 150)
    jitter = tuple(args.jitter or ((0.8, 1.25) if canvases else (0.5, 2.0)))
    train_set = AdeSegmentation(root, "training", num_classes, args.input_size, True, jitter, args.seed)
    val_set = AdeSegmentation(root, "validation", num_classes, args.input_size)

    def config(addp_config):
        return SegmenterConfig(backbone=dense.backbone_dict(args, addp_config, "segmentation"),
                               num_classes=num_classes, decoder_channels=512 if addp_config.embed_dim >= 256 else 64)

    model, source = dense.starting_point(args, "segmenter", Segmenter, config)
    report = {"output_dir": str(out), "start": source, "num_classes": num_classes, "train_images": len(train_set),
              "val_images": len(val_set), "input_size": args.input_size}
    trainer, metrics, best = dense.train_or_evaluate(args, run, model, SegmentationObjective(model), train_set,
                                                     lambda m: evaluate(m, val_set, args.input_size, dist),
                                                     key="mIoU", jitter=jitter)
    if not args.eval_only:  # the per-class IoU list stays in the metrics, not in the best summary
        report.update(steps=trainer.cfg.steps, best={k: v for k, v in (best or {}).items() if k != "IoU"})
    report.update(metrics)
    final = trainer.final_model()
    if dist.is_main:
        if not args.eval_only:
            report["segmenter"] = str(save_checkpoint(out / "segmenter.safetensors", final))
        image, _, _ = val_set[0]
        classes = padded_predict(final, image.to(dist.device), args.input_size).cpu()
        names = CANVAS_CLASSES if canvases else None
        report["picture"] = str(draw_segmentation(image, classes, out / "predictions.png", num_classes, names=names))
        report["wall_time_s"] = round(time.perf_counter() - run.started, 1)
        # an evaluation of a run's weights never replaces the run's own report
        write_json(out / ("eval.json" if args.eval_only else "report.json"), report)
        log.info(f"[segment] mIoU {report['mIoU']:.2f}  aAcc {report['aAcc']:.2f}  ({len(val_set)} images)")
    return report


def cli(argv=None) -> int:
    return run_command("segment", recipes.record_explicit(get_args_parser(), argv), main, argv, interrupted=RESUMABLE)


if __name__ == "__main__":
    sys.exit(cli())
