"""Recognition on the ADDP encoder: classifiers whose weights are in timm's layout.

    images (B, 3, H, W) in [0, 1] --ImageNet mean/std--> encoder --pool--> (B, C) --head--> logits

`ViTClassifier` *is* timm's `VisionTransformer` (its state dict loads into
`timm.create_model("vit_*", pre_norm=True, global_pool=...)` as it is): timm's `norm_pre`
sits exactly where ADDP's `tokenizer_norm` is, so the pretrained features are kept. With
`pre_norm=False` the layout is the official ADDP fine-tuning one (`patch_embed.proj.bias`,
no `norm_pre`). `CNNClassifier` holds any timm CNN (e.g. resnet50) under `body.`.

`encoder_state_from_addp` turns an ADDP network (ours or the official `addp-vit-*-16.pth`)
into such a state dict:
  patch_embed, cls_token, pos_embed, blocks   as they are (pos_embed resampled to the new grid)
  tokenizer_norm                              -> norm_pre
  patch_embed.proj.bias                       -> added to pos_embed[:, 1:] (timm's pre-norm ViT
                                                 has no patch bias; the sum is the same)
  norm                                        -> fc_norm (global_pool "avg") or norm ("token")
  encoder.body.* (ResNet-50 ADDP)             -> the timm CNN's own keys
  decoder, token embedding, MLM head          dropped
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial

import timm
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from .checkpoint import CheckpointError
from .addp import IMAGENET_MEAN, IMAGENET_STD
from ..errors import AddpError
from .registry import check_config, register_model_class, register_preset

GLOBAL_POOLS = ("avg", "token")


@dataclass(frozen=True)
class ClassifierConfig:
    name: str = "vit_base_patch16_cls"
    kind: str = "classifier"
    arch: str = "vit"  # "vit" (timm VisionTransformer) or any timm CNN name, e.g. "resnet50"
    image_size: int = 256
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    global_pool: str = "avg"  # "avg": mean of patch tokens + fc_norm; "token": cls token after norm
    pre_norm: bool = True  # norm_pre = ADDP's tokenizer_norm; False: the official fine-tune layout
    drop_path: float = 0.0
    head_norm: bool = False  # linear probing (MAE): BatchNorm1d(affine=False) before the linear head

    def __post_init__(self):
        check_config(self, ints=dict(image_size=1, patch_size=1, embed_dim=1, depth=1, num_heads=1, num_classes=0),
                     fractions=("drop_path",), positive=("mlp_ratio",), choices={"global_pool": GLOBAL_POOLS},
                     multiples=(("embed_dim", "num_heads"),) + ((("image_size", "patch_size"),)
                                                                if self.arch == "vit" else ()))
        if self.arch != "vit" and not timm.is_model(self.arch):
            raise AddpError(f"{self.name}: arch {self.arch!r} is neither 'vit' nor a timm model")


class _Normalise(nn.Module):
    """Images in [0, 1] -> ImageNet-normalised; the mean/std are buffers, not weights."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


def _probe_head(dim: int, head: nn.Module) -> nn.Module:
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), head)


def vit_kwargs(config: ClassifierConfig) -> dict:
    """The arguments of timm's VisionTransformer for a classifier config."""
    c = config
    return dict(img_size=c.image_size, patch_size=c.patch_size, num_classes=c.num_classes, global_pool=c.global_pool,
                embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=True,
                class_token=True, pre_norm=c.pre_norm, drop_path_rate=c.drop_path,
                norm_layer=partial(nn.LayerNorm, eps=1e-6))


class ViTClassifier(VisionTransformer):
    """timm's VisionTransformer taking images in [0, 1]; the state dict is timm's own."""

    def __init__(self, config: ClassifierConfig):
        c = config
        if c.global_pool not in GLOBAL_POOLS:
            raise AddpError(f"global_pool must be one of {GLOBAL_POOLS}, got {c.global_pool!r}")
        if c.image_size % c.patch_size:
            raise AddpError(f"image size {c.image_size} is not a multiple of the patch size {c.patch_size}")
        super().__init__(**vit_kwargs(c))
        self.config = c
        self.normalise = _Normalise()
        if c.head_norm:
            self.head = _probe_head(c.embed_dim, self.head)

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[-2:]) != (self.config.image_size,) * 2:
            raise AddpError(f"images of shape {tuple(images.shape)} do not fit {self.config.name}, which takes "
                            f"(B, 3, {self.config.image_size}, {self.config.image_size}); build it with "
                            f"image_size={images.shape[-1]} (position embeddings are interpolated on loading)")
        return self.normalise(images)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> tokens (B, 1 + N, C), cls first (timm's forward_features)."""
        return super().forward_features(self._input(images))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> pooled features (B, C): the head's input."""
        return self.forward_head(self.forward_tokens(images), pre_logits=True)

    def forward_intermediates(self, images: torch.Tensor, indices=None, **kwargs):
        """timm's forward_intermediates on images in [0, 1]: block outputs as (B, C, H/p, W/p) maps."""
        return super().forward_intermediates(self._input(images), indices, **kwargs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> logits (B, num_classes)."""
        return self.forward_head(self.forward_tokens(images))


class CNNClassifier(nn.Module):
    """Any timm CNN (ADDP's ResNet-50 encoder) under `body.`, taking images in [0, 1]."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = c = config
        self.normalise = _Normalise()
        self.body = timm.create_model(c.arch, pretrained=False, num_classes=c.num_classes, drop_path_rate=c.drop_path)
        if c.head_norm:
            name = self.body.pretrained_cfg["classifier"]
            setattr(self.body, name, _probe_head(self.body.num_features, getattr(self.body, name)))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> pooled features (B, C)."""
        return self.body.forward_head(self.body.forward_features(self.normalise(images)), pre_logits=True)

    def forward_intermediates(self, images: torch.Tensor, indices=None, **kwargs):
        return self.body.forward_intermediates(self.normalise(images), indices, **kwargs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalise(images))


def build_classifier(config: ClassifierConfig) -> nn.Module:
    return ViTClassifier(config) if config.arch == "vit" else CNNClassifier(config)


build_classifier.config_class = ClassifierConfig
register_model_class("classifier")(build_classifier)


@register_preset
def vit_base_patch16_cls() -> ClassifierConfig:
    """ViT-B/16 classifier at 256 px on an ADDP-B encoder (the paper's fine-tuning model)."""
    return ClassifierConfig(drop_path=0.1)


@register_preset
def vit_large_patch16_cls() -> ClassifierConfig:
    """ViT-L/16 classifier at 256 px on an ADDP-L encoder."""
    return ClassifierConfig(name="vit_large_patch16_cls", embed_dim=1024, depth=24, num_heads=16, drop_path=0.2)


@register_preset
def vit_small_cls() -> ClassifierConfig:
    """The encoder of addp_vit_small (32 px, patch 4, width 64, depth 4) with a 10-way head."""
    return ClassifierConfig(name="vit_small_cls", image_size=32, patch_size=4, embed_dim=64, depth=4,
                            num_heads=4, num_classes=10, drop_path=0.1)


@register_preset
def resnet50_cls() -> ClassifierConfig:
    """timm's ResNet-50 on the encoder of addp_resnet50."""
    return ClassifierConfig(name="resnet50_cls", arch="resnet50")


# -- ADDP encoder -> classifier ----------------------------------------------------------------
def _state_of(source) -> dict[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, dict):
        return source
    raise AddpError(f"expected an ADDP model or state dict, got {type(source).__name__}")


def encoder_state_from_addp(source, image_size: int | None = None, global_pool: str = "avg",
                            pre_norm: bool = True) -> dict[str, torch.Tensor]:
    """The encoder of an ADDP network as a timm state dict (no head).

    source: an ADDP model, our `addp` component's state dict, or an official
    `addp-vit-*-16.pth` state dict (its ViT keys are ours). `image_size` resamples the
    position embeddings to a new grid (bicubic, timm's `resample_abs_pos_embed`).
    """
    state = _state_of(source)
    if any(k.startswith("encoder.body.") for k in state):  # ADDP with a timm CNN encoder
        return {k[len("encoder.body."):]: v for k, v in state.items() if k.startswith("encoder.body.")}
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise CheckpointError("the weights hold no ADDP encoder (no patch_embed/pos_embed or encoder.body. keys)")
    if global_pool not in GLOBAL_POOLS:
        raise AddpError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
    out = {k: v for k, v in state.items() if k.startswith(("patch_embed.", "blocks.")) or k == "cls_token"}
    patch = state["patch_embed.proj.weight"].shape[-1]
    out["pos_embed"] = resample_pos_embed(state["pos_embed"], patch, image_size)
    bias = out.pop("patch_embed.proj.bias", None)
    if pre_norm:
        out["norm_pre.weight"], out["norm_pre.bias"] = state["tokenizer_norm.weight"], state["tokenizer_norm.bias"]
        if bias is not None:  # timm's pre-norm ViT has no patch bias: fold it into the patch positions
            pos = out["pos_embed"].clone()
            pos[:, 1:] += bias
            out["pos_embed"] = pos
    elif bias is not None:
        out["patch_embed.proj.bias"] = bias
    norm = "fc_norm" if global_pool == "avg" else "norm"
    out[f"{norm}.weight"], out[f"{norm}.bias"] = state["norm.weight"], state["norm.bias"]
    return out


def resample_pos_embed(pos: torch.Tensor, patch: int, image_size: int | None) -> torch.Tensor:
    """(1, 1 + n*n, C) -> (1, 1 + (image_size/patch)^2, C), bicubic; unchanged if the grid fits."""
    side = math.isqrt(pos.shape[1] - 1)
    if side * side != pos.shape[1] - 1:
        raise CheckpointError(f"pos_embed has {pos.shape[1]} positions: not a cls slot plus a square grid")
    if image_size is None or image_size == side * patch:
        return pos
    if image_size % patch:
        raise AddpError(f"image size {image_size} is not a multiple of the encoder's patch size {patch}")
    return resample_abs_pos_embed(pos, [image_size // patch] * 2, [side, side], num_prefix_tokens=1)


def classifier_config_for(addp_config, **overrides) -> ClassifierConfig:
    """The classifier config whose encoder matches an ADDP network's."""
    c = addp_config
    if c.encoder != "vit":
        base = dict(name=f"{c.encoder}_cls", arch=c.encoder, image_size=c.image_size)
    else:
        base = dict(name=f"vit_{c.embed_dim}x{c.depth}_p{c.patch_size}_cls", image_size=c.image_size,
                    patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads,
                    mlp_ratio=c.mlp_ratio)
    return ClassifierConfig(**{**base, **overrides})


def load_encoder_state(model: nn.Module, encoder_state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load an encoder state (from `encoder_state_from_addp`) into a classifier; only the head
    (and, for a probe, its BatchNorm) may be missing. Any other difference is one error line."""
    prefix = "body." if isinstance(model, CNNClassifier) else ""
    state = {prefix + k: v for k, v in encoder_state.items()}
    own = model.state_dict()
    head = re.compile(rf"^{re.escape(prefix)}(head|fc|classifier)\.")
    missing = [k for k in own if k not in state and not head.match(k)]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected else
                  f"shape of {shapes[0]}: {tuple(state[shapes[0]].shape)} vs {tuple(own[shapes[0]].shape)}")
        raise CheckpointError(f"{source}: the encoder does not fit {model.config.name} ({detail})")
    model.load_state_dict(state, strict=False)
    return model
