"""`python -m addp.export`: the ADDP encoder as a timm backbone file or a deployable program.

    python -m addp.export --checkpoint addp.safetensors --format timm --output vit.safetensors
    python -m addp.export --checkpoint addp.safetensors --format torch-export --output vit.pt2
    python -m addp.export --checkpoint addp.safetensors --format onnx --output vit.onnx

`timm` writes a plain safetensors state dict in timm's layout (no head) that timm loads as is:

    timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=0,  # or your class count
                      pretrained_cfg_overlay=dict(file="vit.safetensors"),
                      img_size=256, global_pool="avg", pre_norm=True)

(`features_only=True` works the same way for dense heads.) With `--keep-head`, add
`num_classes=K` to the overlay too: timm drops a head whose class count differs from the
pretrained config's (1000). The input is an ADDP checkpoint
(ours or the official addp-vit-*-16.pth) or one of our classifier checkpoints. For a
ResNet-50 ADDP the file is timm's resnet50 layout (`timm.create_model("resnet50", ...)`).

`torch-export` and `onnx` write the same network as one program on images in [0, 1]
(B, 3, H, W) with a dynamic batch size: pooled features (B, C), or logits with
`--keep-head`. `torch.export.load("vit.pt2").module()(images)` runs it; the ONNX file needs
`pip install "addp[onnx]"` (onnx, onnxscript) to write and any ONNX runtime to run. Before a program is
written its output is checked against the eager model's.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from .models.checkpoint import CheckpointError, load_components
from .models.classifier import (GLOBAL_POOLS, ClassifierConfig, CNNClassifier, build_classifier, encoder_state_from_addp,
                         load_encoder_state, resample_pos_embed)
from .cli import ArgumentParser, existing_path, integer, output_file, run_command
from .errors import AddpError
from .runs.files import atomic_write
from .runtime.extras import require

FORMATS = ("timm", "torch-export", "onnx")
CHECK_TOLERANCE = 1e-4  # largest |exported - eager| accepted before writing a program
HEAD_KEYS = ("head.", "fc.", "classifier.")
SUFFIXES = {"timm": ".safetensors", "torch-export": ".pt2", "onnx": ".onnx"}  # what each --format writes
MAX_IMAGE_SIZE = 4096
log = logging.getLogger("addp.export")  # a fixed name: run as `python -m`, __name__ is "__main__"


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser("export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=existing_path,
                   help="ADDP (ours or addp-vit-*-16.pth) or classifier checkpoint")
    p.add_argument("--format", default="timm", choices=FORMATS)
    p.add_argument("--output", required=True, type=output_file,
                   help="the file to write (.safetensors, .pt2 or .onnx)")
    p.add_argument("--img-size", type=integer(1, MAX_IMAGE_SIZE), default=None,
                   help="resample position embeddings to this size")
    p.add_argument("--global-pool", default=None, choices=GLOBAL_POOLS,
                   help="which final norm to write: fc_norm (avg) or norm (token); default: the checkpoint's, "
                        "avg for ADDP")
    p.add_argument("--keep-head", action="store_true", help="classifier checkpoints: keep the classification head")
    p.add_check(_check_suffix)
    return p


def _check_suffix(args) -> None:
    want = SUFFIXES[args.format]
    if Path(args.output).suffix.lower() != want:
        raise AddpError(f"--format {args.format} writes a {want} file; give an --output ending in {want}, "
                        f"got {args.output}")


def timm_state(path: str, image_size: int | None = None, global_pool: str | None = None,
               keep_head: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The encoder of a checkpoint in timm's layout, and the timm arguments it needs."""
    models = load_components(path)
    if "classifier" in models:
        model = models["classifier"]
        c = model.config
        if global_pool is not None and global_pool != c.global_pool:
            raise AddpError(f"{path} was fine-tuned with global_pool={c.global_pool!r}; it cannot be exported "
                            f"as {global_pool!r}")
        if c.head_norm and keep_head:
            raise AddpError(f"{path} is a linear probe (BatchNorm + linear head): timm's head is one Linear; "
                            "export without --keep-head")
        state = model.state_dict()
        if isinstance(model, CNNClassifier):
            state = {k[len("body."):]: v for k, v in state.items()}
        elif image_size:
            state["pos_embed"] = resample_pos_embed(state["pos_embed"], c.patch_size, image_size)
        if not keep_head:
            state = {k: v for k, v in state.items() if not k.startswith(HEAD_KEYS)}
        size = c.image_size if image_size is None else image_size
        return state, _timm_args(c, size, c.global_pool, c.pre_norm, c.num_classes if keep_head else 0)
    if "addp" not in models:
        raise CheckpointError(f"{path} holds no encoder (it holds: {', '.join(models)})")
    addp = models["addp"]
    pool = global_pool or "avg"
    state = encoder_state_from_addp(addp, image_size, pool)
    size = image_size or addp.config.image_size
    return state, _timm_args(addp.config, size, pool, True, 0)


def _timm_args(config, image_size: int, global_pool: str, pre_norm: bool, num_classes: int) -> dict:
    """The architecture arguments of timm.create_model that fit the exported weights."""
    arch = getattr(config, "arch", None) or config.encoder
    if arch != "vit":
        return {"model_name": arch, "num_classes": num_classes}
    return {"img_size": image_size, "patch_size": config.patch_size, "embed_dim": config.embed_dim,
            "depth": config.depth, "num_heads": config.num_heads, "mlp_ratio": config.mlp_ratio,
            "global_pool": global_pool, "pre_norm": pre_norm, "num_classes": num_classes}


def backbone(path: str, image_size: int | None = None, global_pool: str | None = None,
             keep_head: bool = False) -> torch.nn.Module:
    """The network `timm_state` exports, as one of our classifiers (images in [0, 1], ImageNet
    normalisation inside): pooled features, or logits with `keep_head`."""
    state, args = timm_state(path, image_size, global_pool, keep_head)
    if "model_name" in args:  # a timm CNN
        config = ClassifierConfig(name=f"{args['model_name']}_export", arch=args["model_name"],
                                  num_classes=args["num_classes"], image_size=image_size or 224)
    else:
        config = ClassifierConfig(name="vit_export", image_size=args["img_size"], patch_size=args["patch_size"],
                                  embed_dim=args["embed_dim"], depth=args["depth"], num_heads=args["num_heads"],
                                  mlp_ratio=args["mlp_ratio"], num_classes=args["num_classes"],
                                  global_pool=args["global_pool"], pre_norm=args["pre_norm"], drop_path=0.0)
    return load_encoder_state(build_classifier(config), state, str(path)).eval()


def export_program(model: torch.nn.Module, image_size: int) -> torch.export.ExportedProgram:
    """`torch.export` of a classifier on (B, 3, image_size, image_size) images: B dynamic, and
    for a CNN also the height and width (a ViT's position embeddings fix its size)."""
    images = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    dims = {0: torch.export.Dim("batch", min=1, max=65536)}
    if isinstance(model, CNNClassifier):
        dims.update({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO})
    with torch.no_grad():
        return torch.export.export(model, (images,), dynamic_shapes=(dims,))


def _check(program_out: torch.Tensor, eager_out: torch.Tensor, what: str) -> None:
    err = (program_out - eager_out).abs().max().item()
    if not err <= CHECK_TOLERANCE:
        raise AddpError(f"the {what} differs from the eager model by {err:.2e} (> {CHECK_TOLERANCE}); not writing it")


def write_program(model: torch.nn.Module, image_size: int, output, fmt: str) -> Path:
    """Export `model`, check the program against it on 3 images, write it atomically."""
    program = export_program(model, image_size)
    images = torch.rand(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(images)
    if fmt == "torch-export":
        with torch.no_grad():
            _check(program.module()(images), eager, "exported program")
        return atomic_write(output, lambda tmp: _save_pt2(program, tmp))
    require("onnx", "ONNX export")
    require("onnxscript", "ONNX export")  # torch.onnx's exporter needs both
    onnx_program = torch.onnx.export(program, dynamo=True, external_data=False, verbose=False)
    try:
        import onnxruntime  # noqa: F401
        _check(onnx_program(images)[0], eager, "ONNX program")
    except ImportError:
        pass  # nothing to run it with here; torch.export's program was traced from the same graph
    return atomic_write(output, lambda tmp: onnx_program.save(tmp))


def _save_pt2(program: torch.export.ExportedProgram, path) -> None:
    with open(path, "wb") as f:  # a file object: torch.export.save expects a .pt2 name otherwise
        torch.export.save(program, f)


def main(args) -> dict:
    if Path(args.output).resolve() == Path(args.checkpoint).resolve():
        raise AddpError("--output is the --checkpoint file; give another path (the checkpoint is never replaced)")
    if args.format != "timm":
        model = backbone(args.checkpoint, args.img_size, args.global_pool, args.keep_head)
        size = model.config.image_size
        path = write_program(model, size, args.output, args.format)
        out = "logits" if model.config.num_classes else "features"
        load = ("torch.export.load(path).module()" if args.format == "torch-export" else
                "onnxruntime.InferenceSession(path)")
        log.info(f"wrote {path}: {args.format} program, images (B, 3, {size}, {size}) in [0, 1] -> {out}; "
                 f"run it with {load}")
        return {"output": str(path), "format": args.format}
    state, timm_args = timm_state(args.checkpoint, args.img_size, args.global_pool, args.keep_head)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {"format": "pt", "timm_args": json.dumps(timm_args), "source": str(args.checkpoint)}
    path = atomic_write(args.output, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    n = sum(v.numel() for v in tensors.values())
    name = timm_args.pop("model_name", "vit_base_patch16_224")
    k = timm_args["num_classes"]
    overlay = f"dict(file={str(path)!r}" + (f", num_classes={k})" if k else ")")
    args_text = ", ".join(f"{a}={v!r}" for a, v in timm_args.items())
    log.info(f"wrote {path}: {len(tensors)} tensors, {n / 1e6:.2f} M parameters; load it with\n"
             f"  timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay={overlay}, {args_text})")
    return {"output": str(path), "tensors": len(tensors), "parameters": n, "timm_model": name, "timm_args": timm_args}


def cli(argv=None) -> int:
    return run_command("export", get_args_parser(), main, argv)


if __name__ == "__main__":
    sys.exit(cli())
