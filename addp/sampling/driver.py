"""`generate`: N images in batches, eager, compiled or CUDA-graphed, with optional progress and
per-step intermediates; the entry point of the Python API below the pipeline."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from ..runtime.precision import precision_context
from .accelerate import compiled_models, graphed_sampler
from .config import GenerationOutput, Generators, SamplerConfig, sampler_config
from .step import StepCallback, check_finite_images, check_generators, check_models, eval_mode, sample_batch
from ..errors import AddpError


def generate(net: nn.Module, tokenizer: nn.Module, num_images: int, config: Optional[SamplerConfig] = None,
             generator: Generators = None, batch_size: Optional[int] = None, return_intermediates: bool = False,
             progress: Union[bool, Callable] = False, cuda_graph: Optional[bool] = None, compile: bool = False,
             callback: Optional[StepCallback] = None, *, protocol: Optional[str] = None,
             steps: Optional[int] = None, schedule: Optional[str] = None, temperature: Optional[float] = None,
             temperature_schedule: Optional[str] = None, top_p: Optional[float] = None,
             parity: Optional[bool] = None, precision: Optional[str] = None):
    """Generate ``num_images`` images with the alternating denoising process.

    Args:
        net: an ADDP network; ``tokenizer``: the VQ tokenizer with the same codebook size.
            Both run in eval mode (their training flags are restored afterwards) under
            ``torch.no_grad``, on the device of ``net``.
        num_images: N >= 1.
        config: the sampler options (default ``SamplerConfig()``), or
        protocol: a name of ``SAMPLER_PROTOCOLS`` (e.g. "paper-steps256"); not both.
        steps, schedule, temperature, temperature_schedule, top_p, parity: replace the
            field of the config or protocol when given (``sampler_config``).
        generator: source of all randomness: one torch.Generator (any device; the noise is
            drawn there and moved), a list of N (image i from generator i), or None for
            torch's global RNG.
        batch_size: images per batch (default: all N in one batch).
        return_intermediates: also return every step's images, masks and ids.
        progress: show progress in images (``addp.runs.progress``: a bar on a terminal), or a
            callable ``progress(total=N)`` that returns the bar to update (the pipeline's
            ``progress_bar``).
        cuda_graph: replay each batch size's T steps as one captured CUDA graph
            (``CudaGraphSampler``; same images as eager for a CUDA generator). None = on for
            CUDA devices unless ``return_intermediates``, a callback or a list of generators
            asks for the eager loop; True off CUDA is an error.
        compile: torch.compile the networks (the ADDP pixel encoder, its token decoder and
            the tokenizer's decoder; ``compiled_models``). The first batch pays the compilation.
        callback: called after every step of every batch (``denoise``).
        precision: "auto", "fp32", "bf16" or "fp16", resolved as the commands' --precision
            (``addp.runtime.precision``); None runs under the caller's autocast context, if
            any (else fp32).

    Returns:
        images (N, 3, H, W) in [0, 1], or a ``GenerationOutput`` with lists of T tensors
        (N, 3, H, W) / (N, L) / (N, L) when ``return_intermediates``.
    """
    config = sampler_config(config, protocol, steps=steps, schedule=schedule, temperature=temperature,
                            temperature_schedule=temperature_schedule, top_p=top_p, parity=parity)
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise AddpError(f"num_images must be an integer >= 1, got {num_images!r}")
    batch_size = num_images if batch_size is None else batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AddpError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    check_generators(generator, num_images)
    check_models(net, tokenizer)
    per_image = isinstance(generator, (list, tuple))
    device = next(net.parameters()).device
    on_cuda = device.type == "cuda"
    if cuda_graph and not on_cuda:
        raise AddpError("cuda_graph=True needs the network on a CUDA device")
    eager_only = return_intermediates or callback is not None or per_image
    if cuda_graph and eager_only:
        raise AddpError("cuda_graph=True cannot return intermediates, call a step callback or take a list "
                         "of generators (the graph keeps only the final images of one generator)")
    use_graph = (on_cuda and not eager_only) if cuda_graph is None else cuda_graph
    results = []
    with torch.no_grad(), eval_mode(net, tokenizer), precision_context(precision, device), \
            _bar(progress, num_images) as bar:
        if compile:
            net, tokenizer = compiled_models(net, tokenizer)
        for start in range(0, num_images, batch_size):
            b = min(batch_size, num_images - start)
            g = generator[start:start + b] if per_image else generator
            if use_graph:
                results.append(graphed_sampler(net, tokenizer, b, config)(g))
            else:
                results.append(sample_batch(net, tokenizer, b, config, g, return_intermediates, callback))
            if bar is not None:
                bar.update(b)
    if not return_intermediates:
        return check_finite_images(torch.cat(results))
    return _joined(results)


def _bar(progress, total: int):
    """The progress bar `generate` updates (a context manager), or a null context for none."""
    if callable(progress):
        return progress(total=total)
    if progress:
        from ..runs.progress import Progress
        return Progress(total=total, desc="generating", unit="img")
    return contextlib.nullcontext()


def _joined(results) -> GenerationOutput:
    return GenerationOutput(
        images=check_finite_images(torch.cat([r.images for r in results])),
        step_images=[torch.cat(t) for t in zip(*(r.step_images for r in results))],
        step_masks=[torch.cat(t) for t in zip(*(r.step_masks for r in results))],
        step_ids=[torch.cat(t) for t in zip(*(r.step_ids for r in results))],
    )
