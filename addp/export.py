"""`python -m addp.export`: the ADDP encoder as a timm backbone file.

    python -m addp.export --checkpoint addp.safetensors --format timm --output vit.safetensors

writes a plain safetensors state dict in timm's layout (no head) that timm loads as is:

    timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=0,  # or your class count
                      pretrained_cfg_overlay=dict(file="vit.safetensors"),
                      img_size=256, global_pool="avg", pre_norm=True)

(`features_only=True` works the same way for dense heads.) With `--keep-head`, add
`num_classes=K` to the overlay too: timm drops a head whose class count differs from the
pretrained config's (1000). The input is an ADDP checkpoint
(ours or the official addp-vit-*-16.pth) or one of our classifier checkpoints. For a
ResNet-50 ADDP the file is timm's resnet50 layout (`timm.create_model("resnet50", ...)`).
"""
from __future__ import annotations

import json
import logging
import sys

import torch
from safetensors.torch import save_file

from .checkpoint import CheckpointError, load_components
from .classifier import GLOBAL_POOLS, CNNClassifier, encoder_state_from_addp, resample_pos_embed
from .cli import ArgumentParser, existing_path, output_file, positive_int, run_command
from .errors import AddpError
from .files import atomic_write

FORMATS = ("timm",)
HEAD_KEYS = ("head.", "fc.", "classifier.")
log = logging.getLogger("addp.export")  # a fixed name: run as `python -m`, __name__ is "__main__"


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser("export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=existing_path,
                   help="ADDP (ours or addp-vit-*-16.pth) or classifier checkpoint")
    p.add_argument("--format", default="timm", choices=FORMATS)
    p.add_argument("--output", required=True, type=output_file, help="the .safetensors file to write")
    p.add_argument("--img-size", type=positive_int, default=None, help="resample position embeddings to this size")
    p.add_argument("--global-pool", default=None, choices=GLOBAL_POOLS,
                   help="which final norm to write: fc_norm (avg) or norm (token); default: the checkpoint's, "
                        "avg for ADDP")
    p.add_argument("--keep-head", action="store_true", help="classifier checkpoints: keep the classification head")
    return p


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


def main(args) -> dict:
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
