"""The official MAGE / ADDP / VQGAN files (`vqgan_jax_strongaug.ckpt`, `mage-vit{b,l}-1600.pth`,
`addp-vit-{base,large}-16.pth`): which components a state dict holds, their configs read off
the tensor shapes, and the parameters the official code keeps but never reads."""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from ..errors import CheckpointError, first_line
from .registry import build_model, preset_config, vit_size
from .state import load_strict


# Official parameters the architecture never reads (kept in the files by the official code).
IGNORED_OFFICIAL = {
    "predictor": ("token_emb.position_ids", "patch_embed.", "cls_token", "pos_embed",
                  "mask_token", "decoder_pos_embed", "decoder_pred."),
    "addp": ("decoder_pos_embed", "decoder_pred.", "pos_token_embed", "pos_mask_embed"),
    "tokenizer": (),
}



# -- official layouts ----------------------------------------------------------------------
def split_official(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group an official state dict into our components by its key layout."""
    if "encoder.conv_in.weight" in state and "quantize.embedding.weight" in state:
        return {"tokenizer": state}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    main = {}
    for key, value in state.items():
        if key.startswith("vqgan."):
            parts.setdefault("tokenizer", {})[key[len("vqgan."):]] = value
        elif key.startswith("token_predictor."):
            if not key.startswith("token_predictor.vqgan."):
                parts.setdefault("predictor", {})[key[len("token_predictor."):]] = value
        else:
            main[key] = value
    if "token_emb.word_embeddings.weight" in main:
        parts["predictor"] = main
    elif "decoder_pos_mask_embed" in main and "token_emb.weight" in main:
        parts["addp"] = main
    else:
        sample = ", ".join(list(state)[:5])
        raise CheckpointError(f"not an ADDP, MAGE or VQGAN checkpoint (first keys: {sample})")
    return parts



def _count(state, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})



# the codebook of vqgan_jax_strongaug.ckpt; an official ADDP token embedding holds its rows
# first, then the extra tokens (classes and mask)
OFFICIAL_CODEBOOK_SIZE = 1024


def official_config(kind: str, state: dict[str, torch.Tensor]):
    """The config of an official component, read from its tensor shapes."""
    if kind == "tokenizer":
        return preset_config("vqgan_mage", codebook_size=state["quantize.embedding.weight"].shape[0],
                             embed_dim=state["quantize.embedding.weight"].shape[1])
    width = state["blocks.0.norm1.weight"].shape[0]
    size = vit_size(width) or "base"
    if kind == "predictor":
        dec = state["decoder_embed.weight"].shape[0]
        return preset_config(f"mage_vit_{size}_patch16", embed_dim=width, depth=_count(state, "blocks."),
                             decoder_embed_dim=dec, decoder_depth=_count(state, "decoder_blocks."))
    dec = state["decoder_embed.weight"].shape[0]
    return preset_config(f"addp_vit_{size}_patch16", embed_dim=width, depth=_count(state, "blocks."),
                         decoder_embed_dim=dec, decoder_depth=_count(state, "decoder_blocks."),
                         extra_tokens=state["token_emb.weight"].shape[0] - OFFICIAL_CODEBOOK_SIZE)



def strip_ignored(kind: str, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    own = model.state_dict()
    prefixes = IGNORED_OFFICIAL[kind]
    return {k: v for k, v in state.items() if k in own or not k.startswith(prefixes)}



def components_from_official(state: dict[str, torch.Tensor], source: str = "state dict") -> dict[str, nn.Module]:
    """Build and strictly load every component of an official state dict held in memory."""
    try:
        parts = split_official(state)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    models = {}
    for kind, part in parts.items():
        try:
            model = build_model(official_config(kind, part))
        except KeyError as e:
            raise CheckpointError(f"{source}: the {kind} weights lack {e}") from None
        except ValueError as e:
            raise CheckpointError(f"{source}: the {kind} weights describe no valid model ({first_line(e)})") from None
        models[kind] = load_strict(model, strip_ignored(kind, part, model), f"{source} [{kind}]")
    return models
