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
from ..errors import CheckpointError, first_line
from ..runs.files import TEMP_PREFIX, apply_umask, atomic_write, make_folder
from .weights_io import check_regular_file, member, read_tensors, save_safetensors
from .addp import check_tokenizer_fits
from .official import components_from_official
from .state import load_strict, read_state
from .hub import MODEL_INDEX, check_name, resolve
from .registry import build_model, config_from_dict

FORMAT_VERSION = "1"
COMPONENTS = ("addp", "classifier", "predictor", "tokenizer")  # the first one present is "the" model

# diffusers loads a folder whose index names its class as [module, class] and which holds
# <module>.py as a custom pipeline; that file imports the class from this module, which also
# holds the diffusers classes of the components (by name only: models/ never imports diffusers).
DIFFUSERS_MODULE = "addp.sampling.diffusers_pipeline"
PIPELINE_SHIM = "addp_pipeline"
PIPELINE_CLASS = "ADDPDiffusionPipeline"
DIFFUSERS_COMPONENTS = {"addp": "ADDPModel", "tokenizer": "VQTokenizerModel"}


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
    """The main model of a checkpoint (ADDP > classifier > predictor > tokenizer; else its first,
    e.g. a detector), or the one asked for.

    Takes what `load_components` takes: a file, a `save_pretrained` folder or a Hub repo id.
    """
    models = load_components(name_or_path, filename, revision, **hub_kwargs)
    if component is not None:
        if component not in models:
            where = f"{name_or_path}/{filename}" if filename else name_or_path
            raise CheckpointError(f"{where} holds no {component} (it holds: {', '.join(models)})")
        return models[component]
    main = next((c for c in COMPONENTS if c in models), None) or next(iter(models))
    return models[main]


def save_checkpoint(path: str | os.PathLike, models: nn.Module | dict[str, nn.Module]) -> Path:
    """Write models in our format (a .safetensors file), atomically (a temporary file renamed
    into place)."""
    if not isinstance(path, (str, os.PathLike)) or Path(path).suffix != ".safetensors":
        raise CheckpointError(f"checkpoints are written as .safetensors files; got {path!r}")
    models = _by_name(models)
    tensors, components = {}, {}
    for name, model in models.items():
        components[name] = dataclasses.asdict(model.config)
        for key, value in model.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
    metadata = {"addp_format": FORMAT_VERSION, "addp_components": json.dumps(components, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_safetensors(tensors, tmp, metadata))


# -- save_pretrained folders -------------------------------------------------------------
def _by_name(models: nn.Module | dict[str, nn.Module]) -> dict[str, nn.Module]:
    """`models` by component name; anything but this package's models is one error line."""
    named = {getattr(getattr(models, "config", None), "kind", None): models} if isinstance(models, nn.Module) \
        else models
    if not isinstance(named, dict) or not named:
        raise CheckpointError(f"models must be a model of this package or a dict of them, got {type(models).__name__}")
    for name, model in named.items():
        if not (isinstance(name, str) and isinstance(model, nn.Module) and dataclasses.is_dataclass(
                getattr(model, "config", None))):
            raise CheckpointError(f"cannot save {type(model).__name__} as {name!r}: only models of this package "
                                  "(addp.create_model, load_checkpoint) are saved")
    return dict(named)


def save_pretrained(folder: str | os.PathLike, models: nn.Module | dict[str, nn.Module],
                    class_name: str | list | None = None) -> Path:
    """Write models as a folder: `model_index.json` + `<component>/{config.json, model.safetensors}`.

    class_name: the index's `_class_name`. By default a folder holding an ADDP network and its
    tokenizer is a pipeline folder diffusers loads too: its `_class_name` is
    `["addp_pipeline", "ADDPDiffusionPipeline"]` and it holds `addp_pipeline.py` (an import of
    that class from addp); any other set of components is `dict`.

    A new folder is written under a temporary name beside `folder` and renamed into place, so
    it is never half-written. Into an existing save_pretrained folder (it holds
    `model_index.json`) each file is replaced atomically, the index last; other files in it
    (a README, other components) are left as they are. Any other non-empty folder is refused.
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise CheckpointError(f"save_pretrained writes to a folder path, got {type(folder).__name__}")
    folder = Path(folder)
    models = _by_name(models)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise CheckpointError(f"{folder} exists and is not a folder; not replacing it")
    existing = folder.exists() and any(folder.iterdir())
    if existing and not (folder / MODEL_INDEX).is_file():
        raise CheckpointError(f"{folder} exists and is not a save_pretrained folder; not replacing it")
    files = _pretrained_files(models, class_name)
    if existing:
        for rel, write in files.items():
            sub = folder / rel
            if sub.parent.is_symlink() or (sub.parent.exists() and not sub.parent.is_dir()):
                raise CheckpointError(f"{sub.parent} is not a plain folder; not writing into it")
            atomic_write(sub, write)
        return folder
    make_folder(folder.parent)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{TEMP_PREFIX}{folder.name}.{os.getpid()}.", suffix=".tmp"))
    try:
        apply_umask(tmp, folder=True)
        for rel, write in files.items():
            atomic_write(tmp / rel, write)
        os.replace(tmp, folder)  # onto a missing or empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _pretrained_files(models: dict[str, nn.Module], class_name: str | list | None) -> dict[str, object]:
    """Relative path -> writer(tmp) of every file of a save_pretrained folder, the index last."""
    from .. import __version__

    pipeline = class_name is None and set(DIFFUSERS_COMPONENTS) <= set(models)
    if pipeline:
        class_name = [PIPELINE_SHIM, PIPELINE_CLASS]
    index = {"_class_name": "dict" if class_name is None else class_name, "_addp_version": __version__}
    files = {}
    for name, model in models.items():
        member(".", name, "component")
        files.update({f"{name}/{file}": write for file, write in component_files(model).items()})
        diffusers_class = DIFFUSERS_COMPONENTS.get(name) if pipeline else None
        index[name] = [DIFFUSERS_MODULE, diffusers_class] if diffusers_class else ["addp", type(model).__name__]
    if pipeline:
        shim = (f'"""Lets diffusers load this folder (DiffusionPipeline.from_pretrained(folder, '
                f'trust_remote_code=True)); needs addp installed."""\n'
                f"from {DIFFUSERS_MODULE} import {PIPELINE_CLASS}  # noqa: F401\n")
        files[f"{PIPELINE_SHIM}.py"] = lambda tmp: Path(tmp).write_text(shim)
    text = json.dumps(index, indent=2) + "\n"
    files[MODEL_INDEX] = lambda tmp: Path(tmp).write_text(text)
    return files


def component_files(model: nn.Module) -> dict[str, object]:
    """File name -> writer(tmp) of one component's folder: config.json and model.safetensors."""
    config = json.dumps(dataclasses.asdict(model.config), indent=2) + "\n"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {"config.json": lambda tmp: Path(tmp).write_text(config),
            "model.safetensors": lambda tmp: save_safetensors(state, tmp, {"format": "pt"})}


def load_folder(folder: str | os.PathLike) -> dict[str, nn.Module]:
    """The models of a save_pretrained folder, by component name."""
    folder = Path(folder)
    if not (folder / MODEL_INDEX).exists():
        raise CheckpointError(f"{folder} is a folder without {MODEL_INDEX}: not a save_pretrained folder")
    try:
        index = json.loads(check_regular_file(folder / MODEL_INDEX, MODEL_INDEX).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / MODEL_INDEX} is not readable JSON ({first_line(e)})") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"{folder / MODEL_INDEX} is not a JSON object")
    names = [k for k in index if not k.startswith("_")]
    if not names:
        raise CheckpointError(f"{folder / MODEL_INDEX} names no component")
    return {name: load_component(member(folder, name, "component")) for name in names}


def load_component(sub: str | os.PathLike) -> nn.Module:
    """The model of one component folder of a save_pretrained folder (config.json + model.safetensors)."""
    sub = Path(sub)
    for file in ("config.json", "model.safetensors"):
        if not (sub / file).exists():
            raise CheckpointError(f"{sub.parent}: component {sub.name} lacks {file}")
    try:
        config_dict = json.loads(check_regular_file(sub / "config.json", "config").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{sub / 'config.json'} is not readable JSON ({first_line(e)})") from None
    if not isinstance(config_dict, dict):
        raise CheckpointError(f"{sub / 'config.json'} is not a JSON object")
    state, _ = read_tensors(sub / "model.safetensors")
    return load_strict(_build(config_dict, str(sub)), state, str(sub))


def pipeline_models(name_or_path: str | os.PathLike, filename: str | None = None, revision: str | None = None,
                    tokenizer: nn.Module | str | os.PathLike | None = None, **hub_kwargs) -> tuple[nn.Module, nn.Module]:
    """The ADDP network and VQ tokenizer a generation pipeline needs (`ADDPPipeline.from_pretrained`).

    name_or_path: what `resolve` takes, or a folder holding ``addp.safetensors`` (and
        ``tokenizer.safetensors`` when the first has no tokenizer).
    tokenizer: a VQTokenizer or anything `load_checkpoint` takes (e.g. the path of
        ``vqgan_jax_strongaug.ckpt``); needed when the checkpoint holds no tokenizer.
    """
    check_name(name_or_path)
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
    if tokenizer is not None and not isinstance(tokenizer, nn.Module):
        raise CheckpointError(f"tokenizer must be a VQTokenizer or a checkpoint path, got {type(tokenizer).__name__}")
    tokenizer = tokenizer if tokenizer is not None else models.get("tokenizer")
    if tokenizer is None:
        raise CheckpointError(f"{where} holds no VQ tokenizer; pass tokenizer=<a VQGAN checkpoint, "
                              "e.g. vqgan_jax_strongaug.ckpt>")
    check_tokenizer_fits(models["addp"].config, tokenizer.config)
    return models["addp"], tokenizer
