"""One registry for every model of the package: tokenizers, token predictors, ADDP networks.

A preset is a name bound to a config. `create_model(name, **overrides)` replaces fields of
the preset's config and builds the model class the config belongs to.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch.nn as nn

from ..errors import AddpError

_PRESETS: dict[str, Callable[[], Any]] = {}
_MODEL_CLASSES: dict[str, type[nn.Module]] = {}  # config.kind -> model class


def check_config(config, ints: dict[str, int] = {}, fractions: tuple = (), positive: tuple = (),
                 choices: dict[str, tuple] = {}, multiples: tuple = ()) -> None:
    """Raise a one-line AddpError for the first field of `config` that breaks its rule.

    ints: field -> the smallest integer allowed; fractions: numbers in [0, 1); positive:
    finite numbers > 0; choices: field -> allowed values; multiples: (field, divisor field)
    pairs where the first must be a multiple of the second.
    """
    name = getattr(config, "name", type(config).__name__)
    for field, low in ints.items():
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise AddpError(f"{name}: {field} must be an integer >= {low}, got {value!r}")
    for field in fractions:
        value = getattr(config, field)
        if not _is_number(value) or not 0 <= value < 1:
            raise AddpError(f"{name}: {field} must be a number in [0, 1), got {value!r}")
    for field in positive:
        value = getattr(config, field)
        if not _is_number(value) or not (math.isfinite(value) and value > 0):
            raise AddpError(f"{name}: {field} must be a finite number > 0, got {value!r}")
    for field, allowed in choices.items():
        if getattr(config, field) not in allowed:
            raise AddpError(f"{name}: {field} must be one of {', '.join(map(str, allowed))}, "
                            f"got {getattr(config, field)!r}")
    for field, divisor in multiples:
        if getattr(config, field) % getattr(config, divisor):
            raise AddpError(f"{name}: {field} {getattr(config, field)} is not a multiple of {divisor} "
                            f"{getattr(config, divisor)}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def register_model_class(kind: str):
    """Class decorator: models of this `kind` are built by the decorated class."""
    def wrap(cls):
        _MODEL_CLASSES[kind] = cls
        return cls
    return wrap


def register_preset(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Function decorator: the function's name becomes a preset returning its config."""
    _PRESETS[fn.__name__] = fn
    return fn


def list_models(kind: str | None = None) -> list[str]:
    """Preset names, optionally only those of one kind (tokenizer, predictor, addp)."""
    return sorted(n for n, f in _PRESETS.items() if kind is None or f().kind == kind)


def preset_config(name: str, /, **overrides):
    if name not in _PRESETS:
        raise AddpError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    config = _PRESETS[name]()
    fields = {f.name for f in dataclasses.fields(config)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise AddpError(f"{name} has no option {', '.join(bad)}; options: {', '.join(sorted(fields))}")
    own = sorted({"name", "kind"} & set(overrides))
    if own:
        raise AddpError(f"{name}: {own[0]} is the preset's own, not an option; pick another model by its name")
    return dataclasses.replace(config, name=name, **overrides)


def build_model(config) -> nn.Module:
    return _MODEL_CLASSES[config.kind](config)


def create_model(name: str, /, **overrides) -> nn.Module:
    """Build a registered model with freshly initialised weights.

    >>> create_model("addp_vit_small", decoder_depth=2)
    """
    return build_model(preset_config(name, **overrides))


def config_from_dict(data: dict):
    """Inverse of `dataclasses.asdict(config)` for configs saved in our checkpoints."""
    kind = data.get("kind")
    if kind not in _MODEL_CLASSES:
        raise AddpError(f"checkpoint config has unknown model kind {kind!r}")
    config_cls = _MODEL_CLASSES[kind].config_class
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise AddpError(f"checkpoint config has unknown fields {', '.join(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return config_cls(**values)


# the paper's ViT sizes by width (ViT-B/16: 768, ViT-L/16: 1024)
VIT_SIZES = {768: "base", 1024: "large"}


def vit_size(width: int) -> str | None:
    """"base" or "large" for the paper's ViT widths, else None."""
    return VIT_SIZES.get(width)
