"""A frozen-backbone probe of an encoder on the digits canvases: a per-patch linear classifier
(one 1x1 conv, logits upsampled bilinearly to the pixels) trained on the frozen backbone's last
map of the training canvases and scored by mIoU on the validation canvases. It measures what
the features hold, apart from fine-tuning dynamics.

    python tools/dense_probe.py --finetune output/addp_demo/addp.safetensors   # pretrained
    python tools/dense_probe.py --model addp_vit_small                         # random init

Prints one JSON line: the mIoU, pixel accuracy and the settings.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from addp.dense.ade import AdeSegmentation
from addp.dense.backbone import ABS_POS, ViTDetBackbone, backbone_config_for, load_encoder
from addp.dense.canvas import build_canvases
from addp.dense.metrics import confusion, segmentation_metrics
from addp.dense.segmentation import IGNORE
from addp.models import registry
from addp.models.addp import IMAGENET_MEAN, IMAGENET_STD
from addp.models.checkpoint import load_components

NUM_CLASSES = 11  # background and the ten digits


def encoder(args) -> ViTDetBackbone:
    addp_model = load_components(args.finetune)["addp"] if args.finetune else None
    config = addp_model.config if addp_model else registry.preset_config(args.model)
    backbone = ViTDetBackbone(backbone_config_for(config, args.input_size, "detection", 0.0,
                                                  args.window_size, True, args.abs_pos))
    if addp_model:
        load_encoder(backbone, addp_model.state_dict(), args.finetune)
    return backbone.eval()


@torch.no_grad()
def features(backbone: ViTDetBackbone, dataset: AdeSegmentation) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    maps, labels = [], []
    for start in range(0, len(dataset), 50):
        items = [dataset[i] for i in range(start, min(start + 50, len(dataset)))]
        images = torch.stack([(im - mean) / std for im, _, _ in items])
        maps.append(backbone(images)[-1])
        labels.append(torch.stack([lab for _, lab, _ in items]))
    return torch.cat(maps), torch.cat(labels)


def main(args) -> dict:
    torch.manual_seed(args.seed)
    root = Path(args.canvas_dir)
    if not (root / "canvas.json").exists():
        (root / "canvas.json").parent.mkdir(parents=True, exist_ok=True)
        (root / "canvas.json").write_text(json.dumps(build_canvases(root)))
    backbone = encoder(args)
    train = features(backbone, AdeSegmentation(root / "ade", "training", NUM_CLASSES, args.input_size))
    val = features(backbone, AdeSegmentation(root / "ade", "validation", NUM_CLASSES, args.input_size))
    mu, sigma = train[0].mean((0, 2, 3), keepdim=True), train[0].std((0, 2, 3), keepdim=True) + 1e-6
    head = torch.nn.Conv2d(train[0].shape[1], NUM_CLASSES, 1)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=1e-4)
    size = train[1].shape[-2:]
    for step in range(args.steps):
        pick = torch.randint(len(train[0]), (64,))
        logits = F.interpolate(head((train[0][pick] - mu) / sigma), size=size, mode="bilinear")
        loss = F.cross_entropy(logits, train[1][pick], ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = F.interpolate(head((val[0] - mu) / sigma), size=size, mode="bilinear").argmax(1)
    metrics = segmentation_metrics(confusion(pred, val[1], NUM_CLASSES))
    return {"mIoU": round(metrics["mIoU"], 2), "aAcc": round(metrics["aAcc"], 2),
            "encoder": args.finetune or f"random init ({args.model})", "abs_pos": args.abs_pos,
            "window_size": args.window_size, "seed": args.seed}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--finetune", default=None, help="an ADDP checkpoint (default: random init of --model)")
    p.add_argument("--model", default="addp_vit_small", choices=registry.list_models("addp"))
    p.add_argument("--canvas-dir", default="output/dense-canvas")
    p.add_argument("--input-size", type=int, default=96)
    p.add_argument("--window-size", type=int, default=None)
    p.add_argument("--abs-pos", default="interpolate", choices=ABS_POS)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    return p


if __name__ == "__main__":
    print(json.dumps(main(get_args_parser().parse_args())))
