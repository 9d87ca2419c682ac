"""The pipeline as diffusers' own classes, so ``diffusers.DiffusionPipeline.from_pretrained``
loads a folder that ``ADDPPipeline.save_pretrained`` wrote (imported on demand: ``import addp``
never imports diffusers; without diffusers importing this is one error line).

    pipe = diffusers.DiffusionPipeline.from_pretrained("addp-digits", trust_remote_code=True)
    images = pipe(batch_size=4, generator=torch.Generator().manual_seed(0)).images

The folder's ``model_index.json`` names its class ``["addp_pipeline", "ADDPDiffusionPipeline"]``
and the folder holds ``addp_pipeline.py``, one import of `ADDPDiffusionPipeline` from this
module: diffusers runs that file as the folder's custom pipeline (hence ``trust_remote_code``)
and loads each component with its class's ``from_pretrained``: `ADDPModel` and
`VQTokenizerModel` read the component folders through addp's own checked reader, the same
files ``ADDPPipeline.from_pretrained`` reads. The pipeline runs `ADDPPipeline` on the same
modules: the same arguments, the same images for the same generator.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch.nn as nn

from ..errors import AddpError
from ..runtime.extras import require

require("diffusers", "addp's diffusers pipeline")
# diffusers checks a component's class against the names ModelMixin, DiffusionPipeline, ...
# of the module the index names: this one, so they are imported here by those names.
from diffusers import DiffusionPipeline, ModelMixin  # noqa: E402

from ..models.checkpoint import component_files, load_component  # noqa: E402
from ..models.hub import resolve  # noqa: E402
from ..models.weights_io import member  # noqa: E402
from ..runs.files import atomic_write, make_folder  # noqa: E402
from .diffusers_compat import (check_torch_dtype, check_use_safetensors, check_variant,  # noqa: E402
                               refuse_unknown, save_options)
from .pipeline import ADDPPipeline  # noqa: E402

# Keywords diffusers' pipeline loader passes to every model's from_pretrained: memory hints
# that mean nothing for a model read whole into memory.
_LOADER_HINTS = ("low_cpu_mem_usage", "max_memory", "offload_folder", "offload_state_dict", "disable_mmap")
_MODEL_KEYWORDS = ("subfolder", "torch_dtype", "variant", "use_safetensors", "device_map", "quantization_config",
                   "use_flashpack", "cache_dir", "local_files_only", "token", "revision") + _LOADER_HINTS


class _Component(ModelMixin):
    """A diffusers model holding one addp model as ``.model``; it loads and saves addp's
    component folder (``config.json`` + ``model.safetensors``)."""

    kind = ""  # the addp config kind it holds

    def __init__(self, model: nn.Module):
        super().__init__()
        found = getattr(getattr(model, "config", None), "kind", None)
        if found != self.kind:
            raise AddpError(f"{type(self).__name__} holds an addp {self.kind} model, got {type(model).__name__}")
        self.model = model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, torch_dtype=None, variant=None,
                        use_safetensors=None, device_map=None, quantization_config=None, use_flashpack=False,
                        cache_dir=None, local_files_only=False, token=None, revision=None, **kwargs):
        """The component folder ``pretrained_model_name_or_path[/subfolder]`` (a local folder or a
        Hub repo holding a save_pretrained folder)."""
        refuse_unknown(f"{cls.__name__}.from_pretrained", {k: v for k, v in kwargs.items() if k not in _LOADER_HINTS},
                       _MODEL_KEYWORDS)
        check_variant(variant)
        check_use_safetensors(use_safetensors)
        unsupported = (("device_map", device_map, None), ("quantization_config", quantization_config, None),
                       ("use_flashpack", use_flashpack, False))
        for name, value, default in unsupported:
            if value != default:
                raise AddpError(f"{name}={value!r} is not supported by addp's models; leave it unset")
        torch_dtype = check_torch_dtype(torch_dtype)
        folder = resolve(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                         local_files_only=local_files_only, token=token)
        if subfolder:
            folder = member(folder, subfolder, "subfolder")
        model = load_component(folder)
        if model.config.kind != cls.kind:
            raise AddpError(f"{folder} holds an addp {model.config.kind} model, not the {cls.kind} of {cls.__name__}")
        return cls(model.to(dtype=torch_dtype)).eval()

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True, variant=None,
                        push_to_hub: bool = False, **kwargs) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``save_directory``, each atomically."""
        if push_to_hub:
            raise AddpError("push_to_hub: push the whole pipeline (pipe.save_pretrained(folder, push_to_hub=True))")
        save_options(safe_serialization, variant, **kwargs)
        folder = make_folder(save_directory)
        for name, write in component_files(self.model).items():
            atomic_write(folder / name, write)
        return folder


class ADDPModel(_Component):
    """The ADDP network (``.model``: an `addp.ADDP`) as a diffusers model."""

    kind = "addp"


class VQTokenizerModel(_Component):
    """The VQ tokenizer (``.model``: an `addp.VQTokenizer`) as a diffusers model."""

    kind = "tokenizer"


def _delegate(method):
    """A method of `ADDPDiffusionPipeline` that runs `ADDPPipeline`'s on the same modules."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        return method(self.pipeline, *args, **kwargs)
    return run


class ADDPDiffusionPipeline(DiffusionPipeline):
    """`ADDPPipeline` as a diffusers pipeline: ``__call__``, ``inpaint``, ``outpaint``, ``uncrop``,
    ``save_pretrained``, ``to`` and the progress bar are ADDPPipeline's (a ``callback_on_step_end``
    gets that `ADDPPipeline`, ``.pipeline``, as its ``pipe``); the rest is DiffusionPipeline's."""

    def __init__(self, addp: ADDPModel, tokenizer: VQTokenizerModel):
        super().__init__()
        self.register_modules(addp=addp, tokenizer=tokenizer)

    @classmethod
    def from_addp(cls, pipe: ADDPPipeline) -> "ADDPDiffusionPipeline":
        """The diffusers pipeline on the modules of ``pipe`` (shared, not copied)."""
        return cls(ADDPModel(pipe.net), VQTokenizerModel(pipe.tokenizer))

    @property
    def pipeline(self) -> ADDPPipeline:
        """An `ADDPPipeline` on this pipeline's modules, with its progress bar options."""
        pipe = ADDPPipeline(self.addp.model, self.tokenizer.model)
        pipe._progress_bar_config = dict(getattr(self, "_progress_bar_config", {}))
        return pipe

    __call__ = _delegate(ADDPPipeline.__call__)
    inpaint = _delegate(ADDPPipeline.inpaint)
    outpaint = _delegate(ADDPPipeline.outpaint)
    uncrop = _delegate(ADDPPipeline.uncrop)
    save_pretrained = _delegate(ADDPPipeline.save_pretrained)
    enable_model_cpu_offload = _delegate(ADDPPipeline.enable_model_cpu_offload)
    progress_bar = _delegate(ADDPPipeline.progress_bar)

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options of the bar ``progress=True`` shows (`ADDPPipeline.set_progress_bar_config`)."""
        self.pipeline.set_progress_bar_config(**kwargs)
        self._progress_bar_config = dict(kwargs)

    def to(self, *args, **kwargs) -> "ADDPDiffusionPipeline":
        """Move and/or cast both networks (`ADDPPipeline.to`)."""
        self.pipeline.to(*args, **kwargs)
        return self
