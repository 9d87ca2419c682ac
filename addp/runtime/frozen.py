"""torch.compile for passes whose weights stay fixed: sampling, and the trainer's frozen tokenizer
and token predictor.

On CPUs these compile with inductor's freezing: the weights become constants of the graph, so
oneDNN convolutions and linears run on weights packed once, at compile time, instead of on
every call. The compiled code then no longer reads the parameters: callers recompile when
``weights_version`` changes. GPUs get plain ``torch.compile``.
"""
from __future__ import annotations

import torch
from torch import nn


def compile_frozen(fn, **options):
    """``torch.compile(fn, **options)``, frozen when its tensor arguments are on the CPU.

    Freezing is read from inductor's config when a graph compiles (at a call), so every call
    runs under it: a recompilation (a new batch size) is frozen too.
    """
    import torch._inductor.config as inductor_config
    compiled = torch.compile(fn, **options)

    def run(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        on_cpu = bool(tensors) and all(t.device.type == "cpu" for t in tensors)
        with inductor_config.patch(freezing=on_cpu):
            return compiled(*args, **kwargs)

    return run


def weights_version(*modules: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of ``modules`` is replaced or modified in place
    (``load_state_dict``, an optimizer step, ``.to``): what frozen graphs are keyed on."""
    return tuple((id(t), t.data_ptr(), t._version) for m in modules for t in (*m.parameters(), *m.buffers()))
