"""`python -m addp.detect`: object detection and instance segmentation (Mask R-CNN, ViTDet
style) on an ADDP encoder, trained and evaluated with COCO's metrics (pycocotools' COCOeval).

With no `--data-path` it builds the digits canvases (`addp.dense.canvas`) and runs on them;
with `--data-path root` it reads `root/annotations/instances_{train,val}2017.json` and
`root/{train,val}2017/` (COCO as is). Runs on `trainer.Trainer` (DDP under torchrun or srun,
atomic checkpoints, exact resume); writes `detector.safetensors`, `checkpoint-{best,last}`,
`log.jsonl`, `report.json` and `predictions.png` (the first validation image) to
`--output-dir`.
"""
from __future__ import annotations

import logging
import sys
import time

import torch
import torch.distributed

from .training import finetune_engine as engine
from .models.checkpoint import save_checkpoint
from .cli import RESUMABLE, ArgumentParser, run_command
from .dense import recipes as _dense_recipes  # noqa: F401  (registers the Tab. 18 recipes)
from .dense import training as dense
from .dense.coco import CocoInstances, check_same_categories, coco_metrics, to_results
from .dense.detection import DetectionObjective, Detector, DetectorConfig, predict
from .dense.pictures import draw_detections
from .runs.files import write_json
from .runtime.distributed import DistInfo
from .training import recipes

log = logging.getLogger("addp.detect")  # a fixed name: run as `python -m`, __name__ is "__main__"


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser("detect", description=__doc__.split("\n\n")[0])
    dense.add_dense_args(p, "detect", steps=300, blr=1e-2, layer_decay=0.8)
    p.add_argument("--score-threshold", type=float, default=0.25,
                   help="the lowest score drawn in predictions.png (each object with its best label)")
    return p


@torch.no_grad()
def evaluate(model: Detector, dataset: CocoInstances, dist: DistInfo, batch_size: int = 8) -> dict:
    """COCOeval box and mask metrics on `dataset`, sharded over the processes of `dist`."""
    device, world = next(model.parameters()).device, dist.world_size
    indices = list(range(dist.rank, len(dataset), world))
    results = []
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start:start + batch_size]]
        preds = predict(model, torch.stack([im for im, _, _ in items]).to(device))
        for pred, (_, target, _) in zip(preds, items):
            results += to_results({k: v.cpu() for k, v in pred.items()}, target, dataset.cat_ids)
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    return coco_metrics(dataset.coco, results)


def main(args) -> dict:
    with engine.start_run(args, "detect") as run:
        return _detect(args, run)


def _detect(args, run: engine.Run) -> dict:
    dist, out = run.dist, run.out
    root = dense.data_root(args, dist, "coco")
    canvases = not args.data_path
    args.input_size = args.input_size or (96 if canvases else 1024)
    jitter = tuple(args.jitter or ((0.8, 1.25) if canvases else (0.1, 2.0)))
    train_set = CocoInstances(root, "train2017", args.input_size, train=True, jitter=jitter, seed=args.seed)
    val_set = CocoInstances(root, "val2017", args.input_size)
    check_same_categories(train_set, val_set)

    def config(addp_config):
        wide = addp_config.embed_dim >= 256
        return DetectorConfig(backbone=dense.backbone_dict(args, addp_config, "detection"),
                              num_classes=len(train_set.cat_ids), out_channels=256 if wide else 64,
                              fc_dim=1024 if wide else 256, anchor_size=32 if args.input_size >= 512 else 8,
                              categories=tuple(train_set.cat_ids),
                              # a canvas holds at most 4 digits: far fewer proposals and RoIs than COCO
                              **({} if wide else dict(proposals=(256, 128), rois_per_image=128,
                                                      detections_per_image=20)))

    model, source = dense.starting_point(args, "detector", Detector, config)
    report = {"output_dir": str(out), "start": source, "num_classes": model.config.num_classes,
              "train_images": len(train_set), "val_images": len(val_set), "input_size": args.input_size}
    trainer, metrics, best = dense.train_or_evaluate(args, run, model, DetectionObjective(model), train_set,
                                                     lambda m: evaluate(m, val_set, dist), key="bbox_AP", jitter=jitter)
    if not args.eval_only:
        report.update(steps=trainer.cfg.steps, best=best)
    report.update(metrics)
    final = trainer.final_model()
    if dist.is_main:
        if not args.eval_only:
            report["detector"] = str(save_checkpoint(out / "detector.safetensors", final))
        image, _, _ = val_set[0]
        pred = predict(final, image[None].to(dist.device))[0]
        names = [val_set.coco.cats[c]["name"] for c in val_set.cat_ids]
        report["picture"] = str(draw_detections(image, {k: v.cpu() for k, v in pred.items()},
                                                out / "predictions.png", names, args.score_threshold))
        report["wall_time_s"] = round(time.perf_counter() - run.started, 1)
        # an evaluation of a run's weights never replaces the run's own report
        write_json(out / ("eval.json" if args.eval_only else "report.json"), report)
        log.info(f"[detect] AP box {report['bbox_AP']:.2f}  AP mask {report['segm_AP']:.2f}  "
                 f"(AP50 box {report['bbox_AP50']:.2f}; {len(val_set)} images)")
    return report


def cli(argv=None) -> int:
    return run_command("detect", recipes.record_explicit(get_args_parser(), argv), main, argv, interrupted=RESUMABLE)


if __name__ == "__main__":
    sys.exit(cli())
