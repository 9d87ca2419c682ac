"""The acceleration layer of the sampler, the one place that compiles or captures: torch.compile
of the networks (`compiled_models`) and the whole batch replayed as one CUDA graph
(`CudaGraphSampler`), both cached on the network."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..runtime.frozen import compile_frozen, weights_version
from .config import SamplerConfig
from .step import sample_batch


class _CompiledNet(nn.Module):
    """An ADDP network with a compiled pixel encoder and a compiled token decoder; the
    decoder's sequence length changes with the number of reliable tokens at every step, so
    it is compiled for dynamic shapes: one graph for the counts 2 to L - 1, and graphs of
    their own for 0, 1 and L (torch.compile's default). The schedule fixes the counts, so all of
    them compile in the first batch."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.config = net, net.config
        self.encoder = compile_frozen(net.forward_encoder)
        self.decoder = compile_frozen(net.forward_decoder, dynamic=True)

    def forward(self, x, ids, mask, num_reliable=None):
        return self.decoder(self.encoder(x), ids, mask, num_reliable)


class _CompiledTokenizer(nn.Module):
    """A VQ tokenizer whose decoder (fixed shapes for a batch size) is compiled."""

    def __init__(self, tokenizer: nn.Module):
        super().__init__()
        self.tokenizer, self.config = tokenizer, tokenizer.config
        self.decode = compile_frozen(tokenizer.decode_embeddings)

    @property
    def codebook(self) -> torch.Tensor:
        return self.tokenizer.codebook

    def decode_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        return self.decode(emb)


class _SamplerCache(dict):
    """Compiled parts and CUDA graphs of one network, kept on it (so they live as long as it
    does); a copy or pickle of the network starts with an empty cache."""

    def __deepcopy__(self, memo):
        return _SamplerCache()

    def __reduce__(self):
        return _SamplerCache, ()


def _cache(net: nn.Module) -> dict:
    # a plain attribute, not a submodule: not in the state dict, not moved by .to()
    return net.__dict__.setdefault("_addp_sampler_cache", _SamplerCache())


def compiled_models(net: nn.Module, tokenizer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(net, tokenizer) compiled (cached on the net): the ADDP pixel encoder, its token
    decoder (dynamic shapes) and the tokenizer's decoder. Other networks are compiled whole.
    On CPUs the graphs are frozen (``addp.runtime.frozen``): when a weight of either network has changed
    they are rebuilt, after ``torch.compiler.reset()``."""
    cache = _cache(net)
    key = ("compiled", id(tokenizer))
    version = weights_version(net, tokenizer)
    if key in cache and cache[key][1] != version and not next(net.parameters()).is_cuda:
        # dynamo's guards do not look at weight values, so it would run the old frozen graphs
        torch.compiler.reset()
    if key not in cache or cache[key][0][1].tokenizer is not tokenizer or cache[key][1] != version:
        split = hasattr(net, "forward_encoder") and net.config.token_input != "encoder_decoder"
        fast_net = _CompiledNet(net) if split else _CompiledWhole(net)
        cache[key] = ((fast_net, _CompiledTokenizer(tokenizer)), version)
    return cache[key][0]


class _CompiledWhole(nn.Module):
    """A network other than the split ADDP encoder/decoder, compiled whole."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.config = net, net.config
        self.run = compile_frozen(net)

    def forward(self, *args, **kwargs):
        return self.run(*args, **kwargs)


def uncached_autocast() -> torch.autocast:
    """The caller's CUDA autocast state with autocast's weight cache off. The cache holds the
    low-precision copies of the weights only until the outermost autocast block exits; a graph
    captured with them would replay reads of freed memory. Without the cache, the casts are
    kernels of the graph and their outputs live in its memory pool."""
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                          cache_enabled=False)


class CudaGraphSampler:
    """``sample_batch`` for one (network, tokenizer, batch size, config), captured as one
    CUDA graph and replayed: the T steps launch as a single graph, with no Python between
    kernels. Shapes are static (every step's mask_len and number of reliable tokens is
    fixed by the schedule), and the noise comes from a private CUDA generator registered
    with the graph.

    A CUDA generator's state is copied into the private one before the replay and the
    caller's generator is advanced by what the eager sampler would have drawn, so the
    replay computes exactly what ``sample_batch`` computes from the same generator. A
    generator on another device (e.g. the CPU) seeds the private one with
    ``torch.randint(2**63 - 1, (), generator=generator)``: the replay then computes what
    ``sample_batch`` computes from a CUDA generator with that seed.

    The graph reads the module's parameters in place: load new weights with
    ``load_state_dict`` (in place), not by replacing parameter tensors.
    """

    def __init__(self, net: nn.Module, tokenizer: nn.Module, batch_size: int, config: SamplerConfig):
        device = next(net.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the network on a CUDA device, it is on {device}")
        self.net, self.tokenizer, self.batch_size, self.config = net, tokenizer, batch_size, config
        self.generator = torch.Generator(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        # warm-up: compiles the Triton kernels and picks the cuDNN algorithms before the capture
        with torch.cuda.stream(side), torch.no_grad(), uncached_autocast():
            self._run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.graph.register_generator_state(self.generator)
        with torch.cuda.graph(self.graph), torch.no_grad(), uncached_autocast():
            self.images = self._run()

    def _run(self) -> torch.Tensor:
        return sample_batch(self.net, self.tokenizer, self.batch_size, self.config, self.generator)

    def __call__(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One batch (B, 3, H, W) drawn from ``generator`` (None: the device's default generator)."""
        device = self.images.device
        source = generator if generator is not None else torch.cuda.default_generators[device.index or 0]
        if source.device.type == "cuda":
            self.generator.set_state(source.get_state())
            self.graph.replay()
            source.set_state(self.generator.get_state())
        else:
            self.generator.manual_seed(graph_seed(source))
            self.graph.replay()
        return self.images.clone()


def graph_seed(generator: torch.Generator) -> int:
    """The seed a non-CUDA generator gives the CUDA-graph sampler's private generator."""
    return int(torch.randint(2 ** 63 - 1, (), generator=generator))


def graphed_sampler(net: nn.Module, tokenizer: nn.Module, batch_size: int, config: SamplerConfig) -> CudaGraphSampler:
    """The ``CudaGraphSampler`` for these arguments, captured on first use and cached on the net."""
    cache = _cache(net)
    # a graph replays the kernels it captured: autocast at capture time is part of the key
    autocast = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda")
    key = ("graph", id(tokenizer), batch_size, config, autocast)
    if key not in cache or cache[key].tokenizer is not tokenizer:
        cache[key] = CudaGraphSampler(net, tokenizer, batch_size, config)
    return cache[key]


def clear_cache(net: nn.Module) -> None:
    """Drop the compiled parts and CUDA graphs cached on ``net``: needed after its parameters
    are replaced (``net.to(other device or dtype)``), since a graph reads them in place."""
    _cache(net).clear()
