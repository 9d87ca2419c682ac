"""Reading official MAGE/ADDP/VQGAN checkpoints and reading/writing our own.

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
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import AddpError
from ..runs.files import atomic_write
from .registry import vit_size, build_model, config_from_dict, preset_config

FORMAT_VERSION = "1"
COMPONENTS = ("addp", "classifier", "predictor", "tokenizer")  # the first one present is "the" model
MODEL_INDEX = "model_index.json"

# Official parameters the architecture never reads (kept in the files by the official code).
IGNORED_OFFICIAL = {
    "predictor": ("token_emb.position_ids", "patch_embed.", "cls_token", "pos_embed",
                  "mask_token", "decoder_pos_embed", "decoder_pred."),
    "addp": ("decoder_pos_embed", "decoder_pred.", "pos_token_embed", "pos_mask_embed"),
    "tokenizer": (),
}


class CheckpointError(AddpError):
    pass


# -- reading raw files ---------------------------------------------------------------------
def read_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Tensors of a checkpoint file and, for our format, its component description."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if path.suffix == ".safetensors":
        tensors, components = _read_safetensors(path)
    else:
        tensors, components = _read_torch(path), None
    check_finite(tensors, str(path))
    return tensors, components


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or Inf, naming the first such tensor."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{source}: tensor {name} holds non-finite values (NaN or Inf); refusing to load it")


def _read_safetensors(path: Path):
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None
    metadata = (header.get("__metadata__") if isinstance(header, dict) else None) or {}
    if "addp_components" not in metadata:
        raise CheckpointError(f"{path} is a safetensors file without an addp component description")
    try:
        components = json.loads(metadata["addp_components"])
    except ValueError:
        components = None
    if not isinstance(components, dict) or not all(isinstance(c, dict) for c in components.values()):
        raise CheckpointError(f"{path}: its addp component description is not a JSON object of configs")
    return tensors, components


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds Python objects other than tensors; refusing to unpickle it "
                              f"({_first_line(e)})") from None
    except Exception as e:  # truncated zip, not a torch file at all, ...
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({_first_line(e)})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


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
                         extra_tokens=state["token_emb.weight"].shape[0] - 1024)


def strip_ignored(kind: str, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    own = model.state_dict()
    prefixes = IGNORED_OFFICIAL[kind]
    return {k: v for k, v in state.items() if k in own or not k.startswith(prefixes)}


# -- strict loading ------------------------------------------------------------------------
def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load `state` into `model`; any missing/unexpected key or shape mismatch is one error line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, tuple(own[k].shape), tuple(state[k].shape))
              for k in own if k in state and own[k].shape != state[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys ({_few(missing)})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys ({_few(unexpected)})")
    if shapes:
        k, want, got = shapes[0]
        problems.append(f"{len(shapes)} shape mismatches (first {k}: expected {want}, found {got})")
    if problems:
        name = getattr(model.config, "name", type(model).__name__)
        raise CheckpointError(f"{source} does not fit {name}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    return model


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


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
    from .hub import resolve  # hub reads this module's names

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
        raise CheckpointError(f"{source}: bad config ({_first_line(e)})") from None


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
            raise CheckpointError(f"{source}: the {kind} weights describe no valid model ({_first_line(e)})") from None
        models[kind] = load_strict(model, strip_ignored(kind, part, model), f"{source} [{kind}]")
    return models


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
        raise CheckpointError(f"{folder / MODEL_INDEX} is not readable JSON ({_first_line(e)})") from None
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
            raise CheckpointError(f"{sub} is not readable ({_first_line(e)})") from None
        models[name] = load_strict(_build(config_dict, str(sub)), state, str(sub))
    return models
