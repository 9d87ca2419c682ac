"""The ADDP encoders and classifiers as timm models (registered by `import addp`).

    import addp, timm
    backbone = timm.create_model("addp_vit_base_patch16", pretrained=True, features_only=True)
    maps = backbone(normalised_images)    # the last three blocks, (B, 768, H/16, W/16) each, as timm's ViTs

timm name                      what                                          pretrained file (Hub Changyao/ADDP)
addp_vit_base_patch16          encoder of our preset addp_vit_base_patch16   addp-vit-base-16.pth
addp_vit_large_patch16         encoder of our preset addp_vit_large_patch16  addp-vit-large-16.pth
addp_vit_small                 encoder of our demo preset addp_vit_small     none (pass a file)
addp_vit_{base_patch16,large_patch16,small}_cls
                               our classifier presets vit_*_cls              the encoder's file; the head starts fresh

The models are timm's own VisionTransformer (ImageNet-normalised input, timm's key layout,
`forward_intermediates`, `features_only`); their architecture is read from our presets, so
they cannot drift apart. Names: an encoder carries the name of the ADDP preset it is the
encoder of, a classifier `addp_` + our classifier preset's name; registration refuses a name
timm already has from elsewhere.

`pretrained_cfg_overlay=dict(file=...)` takes any file holding an ADDP encoder: the official
`addp-vit-*-16.pth`, our single-file checkpoints (an `addp` or `classifier` component), a
save_pretrained component (`<folder>/addp/model.safetensors`) or `python -m addp.export` output.
The weights are converted on loading (`checkpoint_filter_fn`).
"""
from __future__ import annotations

import dataclasses

import torch
import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from .classifier import GLOBAL_POOLS, classifier_config_for, encoder_state_from_addp, resample_pos_embed, vit_kwargs
from ..errors import AddpError
from .registry import list_models, preset_config
from .weights_io import check_tensors

HUB_ID = "Changyao/ADDP"
# timm name -> (our preset it is built from, the official file on the Hub or None)
MODELS = {
    "addp_vit_base_patch16": ("addp_vit_base_patch16", "addp-vit-base-16.pth"),
    "addp_vit_large_patch16": ("addp_vit_large_patch16", "addp-vit-large-16.pth"),
    "addp_vit_small": ("addp_vit_small", None),
    "addp_vit_base_patch16_cls": ("vit_base_patch16_cls", "addp-vit-base-16.pth"),
    "addp_vit_large_patch16_cls": ("vit_large_patch16_cls", "addp-vit-large-16.pth"),
    "addp_vit_small_cls": ("vit_small_cls", None),
}
TIMM_OUT_INDICES = 3  # default `out_indices` of features_only, as timm's ViTs: the last three blocks


def _config(timm_name: str):
    """Our classifier config for a timm name: the encoder of an ADDP preset has no head."""
    preset = preset_config(MODELS[timm_name][0])
    if preset.kind == "addp":
        return classifier_config_for(preset, num_classes=0, drop_path=0.0)
    return dataclasses.replace(preset, drop_path=0.0)


def _pretrained_cfg(timm_name: str) -> dict:
    c, file = _config(timm_name), MODELS[timm_name][1]
    hub = dict(hf_hub_id=HUB_ID, hf_hub_filename=file) if file else {}
    # crop_pct 1.0: evaluation resizes to the input size and centre-crops it (addp.training.data, and
    # MAE's rule above 224 px that the official fine-tuning follows)
    return dict(**hub, num_classes=c.num_classes, input_size=(3, c.image_size, c.image_size), fixed_input_size=True,
                mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, interpolation="bicubic", crop_pct=1.0,
                first_conv="patch_embed.proj", classifier="head", license="apache-2.0", paper_ids="arXiv:2306.05423",
                paper_name="ADDP: Learning General Representations for Image Recognition and Generation with "
                           "Alternating Denoising Diffusion Process")


default_cfgs = generate_default_cfgs({name: _pretrained_cfg(name) for name in MODELS})


# -- loading any ADDP encoder file into timm's layout ----------------------------------------
def _component(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder-holding part of a loaded file: the `model` / `state_dict` entry of an official
    file (timm unwraps it for local files only), the `classifier.` or `addp.` component of one
    of our single-file checkpoints; other state dicts pass unchanged."""
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
    for prefix in ("classifier.", "addp."):
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if part and "patch_embed.proj.weight" in part:
            return part
    return state


def checkpoint_filter_fn(state: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Any ADDP encoder state dict -> `model`'s state dict (timm calls this on loading).

    An ADDP network (official or ours) is converted by `encoder_state_from_addp`; a timm
    layout (our classifiers, `addp.export` files) is taken as it is. Position embeddings are
    resampled to the model's image size; a missing head keeps the model's fresh one.
    """
    if not isinstance(state, dict):
        check_tensors(state, "the pretrained weights")  # raises: not a state dict
    state = check_tensors(_component(state), "the pretrained weights")
    size = model.patch_embed.img_size[0]
    if "tokenizer_norm.weight" in state or "decoder_pos_mask_embed" in state:  # an ADDP network
        if model.global_pool not in GLOBAL_POOLS:
            raise AddpError(f"an ADDP encoder loads with global_pool in {GLOBAL_POOLS}, not {model.global_pool!r}")
        state = encoder_state_from_addp(state, size, model.global_pool)
    elif "pos_embed" in state:
        state = dict(state, pos_embed=resample_pos_embed(state["pos_embed"], model.patch_embed.patch_size[0], size))
    own = model.state_dict()
    for key in ("head.weight", "head.bias"):
        if key in own and key not in state:
            state[key] = own[key]
    return state


def _create(timm_name: str, pretrained: bool, **kwargs) -> VisionTransformer:
    args = vit_kwargs(_config(timm_name))
    del args["num_classes"]  # timm takes it from the pretrained config unless it is given
    args.update(kwargs)
    out_indices = args.pop("out_indices", TIMM_OUT_INDICES)
    return build_model_with_cfg(VisionTransformer, timm_name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **args)


def _register(fn):
    """timm's register_model, refusing a name timm already has from elsewhere and checking
    the naming rule that keeps timm's names apart from our registry's."""
    name = fn.__name__
    ours, _ = MODELS[name]
    if name != ours and name in list_models():
        raise AddpError(f"timm name {name} is also one of our presets but not the one it is built from ({ours})")
    if timm.is_model(name) and timm.models.model_entrypoint(name).__module__ != __name__:
        raise AddpError(f"timm already has a model named {name}; not replacing it")
    return register_model(fn)


@_register
def addp_vit_base_patch16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The ADDP ViT-B/16 encoder at 256 px (addp-vit-base-16.pth), no head."""
    return _create("addp_vit_base_patch16", pretrained, **kwargs)


@_register
def addp_vit_large_patch16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The ADDP ViT-L/16 encoder at 256 px (addp-vit-large-16.pth), no head."""
    return _create("addp_vit_large_patch16", pretrained, **kwargs)


@_register
def addp_vit_small(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The encoder of the 32 px demo preset addp_vit_small (patch 4, width 64, depth 4)."""
    return _create("addp_vit_small", pretrained, **kwargs)


@_register
def addp_vit_base_patch16_cls(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/16 classifier (our vit_base_patch16_cls): ADDP-B encoder + 1000-way head."""
    return _create("addp_vit_base_patch16_cls", pretrained, **kwargs)


@_register
def addp_vit_large_patch16_cls(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-L/16 classifier (our vit_large_patch16_cls): ADDP-L encoder + 1000-way head."""
    return _create("addp_vit_large_patch16_cls", pretrained, **kwargs)


@_register
def addp_vit_small_cls(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The demo classifier (our vit_small_cls): addp_vit_small's encoder + 10-way head."""
    return _create("addp_vit_small_cls", pretrained, **kwargs)
