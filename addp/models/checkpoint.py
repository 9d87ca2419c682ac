"""Loading any checkpoint (ours, official, or a Hub id) and writing our own.

Our formats:
- one safetensors file; its metadata holds a JSON description of the components it carries
  (`addp`, `tokenizer`, `predictor`, `classifier`), each component's tensors under its name
  as a key prefix (`save_checkpoint`);
- a folder, the layout diffusers and transformers use (`save_pretrained`):
  `model_index.json` naming the components, and per component a subfolder holding
  `config.json` (the model's config) and `model.safetensors` (its state dict).
Loading takes either, an official file, or a Hub repo id (`addp.models.hub.resolve`). Official
`.pth`/`.ckpt` files are read with `torch.load(weights_only=True)`: arbitrary pickled
objects are never executed. Every problem is raised as a `CheckpointError` whose message is one line.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, first_line
from ..runs.files import atomic_write
from .addp import check_tokenizer_fits
from .official import components_from_official
from .state import load_strict, read_state
from .hub import MODEL_INDEX, resolve
from .registry import build_model, config_from_dict

FORMAT_VERSION = "1"
COMPONENTS = ("addp", "classifier", "predictor", "tokenizer")  # the first one present is "the" model


# -- public API ----------------------------------------------------------------------------
def load_components(name_or_path: str | os.PathLike, filename: str | None = None, revision: str | None = None,
                    **hub_kwargs) -> dict[str, nn.Module]:
    """Every model a checkpoint holds, by component name (`addp`, `predictor`, `tokenizer`, ...).

    name_or_path: a checkpoint file, a `save_pretrained` folder, or a Hub repo id
        (`addp.models.hub.resolve`; `filename` picks a file of a folder or repo, `revision` a Hub
        revision; `hub_kwargs`: cache_dir, local_files_only).
    Reads our safetensors files and folders and the official `vqgan_jax_strongaug.ckpt`,
    `mage-vit{b,l}-1600.pth` and `addp-vit-{base,large}-16.pth` as they are.
    """
    path = resolve(name_or_path, filename, revision, **hub_kwargs)
    if path.is_dir():
        return load_folder(path)
    state, components = read_state(path)
    if components is None:
        return components_from_official(state, str(path))
    models = {}
    for name, config_dict in components.items():
        prefix = name + "."
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        models[name] = load_strict(_build(config_dict, f"{path}: {name}"), part, f"{path} [{name}]")
    return models


def _build(config_dict: dict, source: str) -> nn.Module:
    try:
        return build_model(config_from_dict(config_dict))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: bad config ({first_line(e)})") from None


def load_checkpoint(name_or_path: str | os.PathLike, component: str | None = None, filename: str | None = None,
                    revision: str | None = None, **hub_kwargs) -> nn.Module:
    """The main model of a checkpoint (ADDP > classifier > predictor > tokenizer), or the one asked for.

    Takes what `load_components` takes: a file, a `save_pretrained` folder or a Hub repo id.
    """
    models = load_components(name_or_path, filename, revision, **hub_kwargs)
    if component is not None:
        if component not in models:
            where = f"{name_or_path}/{filename}" if filename else name_or_path
            raise CheckpointError(f"{where} holds no {component} (it holds: {', '.join(models)})")
        return models[component]
    return next(models[c] for c in COMPONENTS if c in models)


def save_checkpoint(path: str | os.PathLike, models: nn.Module | dict[str, nn.Module]) -> Path:
    """Write models in our format (a .safetensors file), atomically (a temporary file renamed
    into place)."""
    if Path(path).suffix != ".safetensors":
        raise CheckpointError(f"checkpoints are written as .safetensors files; got {path}")
    models = _by_name(models)
    tensors, components = {}, {}
    for name, model in models.items():
        components[name] = dataclasses.asdict(model.config)
        for key, value in model.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
    metadata = {"addp_format": FORMAT_VERSION, "addp_components": json.dumps(components)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# -- save_pretrained folders -------------------------------------------------------------
def _by_name(models: nn.Module | dict[str, nn.Module]) -> dict[str, nn.Module]:
    return {models.config.kind: models} if isinstance(models, nn.Module) else dict(models)


def save_pretrained(folder: str | os.PathLike, models: nn.Module | dict[str, nn.Module],
                    class_name: str | None = None) -> Path:
    """Write models as a folder: `model_index.json` + `<component>/{config.json, model.safetensors}`.

    class_name: the index's `_class_name`; default `ADDPPipeline` when the models are an
    ADDP network and its tokenizer, else `dict` (a plain set of components).

    The folder is written under a temporary name beside `folder` and renamed into place, so
    `folder` is never half-written. An existing `folder` is replaced only when it is itself a
    save_pretrained folder (it holds `model_index.json`) or empty.
    """
    from .. import __version__

    folder = Path(folder)
    models = _by_name(models)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / MODEL_INDEX).exists())):
        raise CheckpointError(f"{folder} exists and is not a save_pretrained folder; not replacing it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.{os.getpid()}.", suffix=".tmp"))
    try:
        if class_name is None:
            class_name = "ADDPPipeline" if {"addp", "tokenizer"} <= set(models) else "dict"
        index = {"_class_name": class_name, "_addp_version": __version__}
        for name, model in models.items():
            (tmp / name).mkdir()
            (tmp / name / "config.json").write_text(json.dumps(dataclasses.asdict(model.config), indent=2) + "\n")
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(state, tmp / name / "model.safetensors", metadata={"format": "pt"})
            index[name] = ["addp", type(model).__name__]
        (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _swap_in(new: Path, folder: Path) -> None:
    """Rename the finished folder `new` onto `folder`; an old `folder` is moved aside first
    and deleted after (a folder cannot be renamed over a non-empty one)."""
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".old"))
        os.replace(folder, old / folder.name)
    try:
        os.replace(new, folder)
    except BaseException:
        if old is not None:
            os.replace(old / folder.name, folder)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def load_folder(folder: str | os.PathLike) -> dict[str, nn.Module]:
    """The models of a save_pretrained folder, by component name."""
    folder = Path(folder)
    try:
        index = json.loads((folder / MODEL_INDEX).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is a folder without {MODEL_INDEX}: not a save_pretrained folder") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / MODEL_INDEX} is not readable JSON ({first_line(e)})") from None
    names = [k for k in index if not k.startswith("_")]
    if not names:
        raise CheckpointError(f"{folder / MODEL_INDEX} names no component")
    models = {}
    for name in names:
        sub = folder / name
        for file in ("config.json", "model.safetensors"):
            if not (sub / file).is_file():
                raise CheckpointError(f"{folder}: component {name} lacks {file}")
        try:
            config_dict = json.loads((sub / "config.json").read_text())
            state = load_file(str(sub / "model.safetensors"))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{sub} is not readable ({first_line(e)})") from None
        models[name] = load_strict(_build(config_dict, str(sub)), state, str(sub))
    return models


def pipeline_models(name_or_path: str | os.PathLike, filename: str | None = None, revision: str | None = None,
                    tokenizer: nn.Module | str | os.PathLike | None = None, **hub_kwargs) -> tuple[nn.Module, nn.Module]:
    """The ADDP network and VQ tokenizer a generation pipeline needs (`ADDPPipeline.from_pretrained`).

    name_or_path: what `resolve` takes, or a folder holding ``addp.safetensors`` (and
        ``tokenizer.safetensors`` when the first has no tokenizer).
    tokenizer: a VQTokenizer or anything `load_checkpoint` takes (e.g. the path of
        ``vqgan_jax_strongaug.ckpt``); needed when the checkpoint holds no tokenizer.
    """
    source, local = name_or_path, Path(name_or_path)
    if filename is None and local.is_dir() and not (local / MODEL_INDEX).exists():
        source = local / "addp.safetensors"
        if not source.exists():
            raise CheckpointError(f"{local} holds neither {MODEL_INDEX} nor addp.safetensors")
        if tokenizer is None and (local / "tokenizer.safetensors").exists():
            tokenizer = local / "tokenizer.safetensors"
    models = load_components(source, filename, revision, **hub_kwargs)
    where = f"{source}/{filename}" if filename else str(source)
    if "addp" not in models:
        raise CheckpointError(f"{where} holds no ADDP network (it holds: {', '.join(models)})")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_checkpoint(tokenizer, "tokenizer")
    tokenizer = tokenizer if tokenizer is not None else models.get("tokenizer")
    if tokenizer is None:
        raise CheckpointError(f"{where} holds no VQ tokenizer; pass tokenizer=<a VQGAN checkpoint, "
                              "e.g. vqgan_jax_strongaug.ckpt>")
    check_tokenizer_fits(models["addp"].config, tokenizer.config)
    return models["addp"], tokenizer
