"""One registry for every model of the package: tokenizers, token predictors, ADDP networks.

A preset is a name bound to a config. `create_model(name, **overrides)` replaces fields of
the preset's config and builds the model class the config belongs to.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch.nn as nn

_PRESETS: dict[str, Callable[[], Any]] = {}
_MODEL_CLASSES: dict[str, type[nn.Module]] = {}  # config.kind -> model class


class AddpError(ValueError):
    """An error in what the user asked for or gave; its message is one line."""


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


def preset_config(name: str, **overrides):
    if name not in _PRESETS:
        raise AddpError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    config = _PRESETS[name]()
    fields = {f.name for f in dataclasses.fields(config)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise AddpError(f"{name} has no option {', '.join(bad)}; options: {', '.join(sorted(fields))}")
    return dataclasses.replace(config, name=name, **overrides)


def build_model(config) -> nn.Module:
    return _MODEL_CLASSES[config.kind](config)


def create_model(name: str, **overrides) -> nn.Module:
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
