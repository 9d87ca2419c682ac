"""The alternating denoising step and the loop over a plan of steps: pixels -> token
distribution -> pixels.

Every step (s = 0 .. T-1), with L token positions and a K-entry codebook:

    logits   = net(x, ids, mask, num_reliable)[..., :K]                (B, L, K)
    sampled  = categorical(softmax(logits)) at every position          (optionally top-p)
    ids      = where(mask, sampled, ids)             reliable tokens never change
    conf     = log p(sampled) + tau_s * Gumbel,  +inf at reliable positions
    mask     = the mask_len[s] lowest-confidence positions of each row (ties: lower index)
    x        = clamp(decode(where(mask, softmax(logits) @ codebook, codebook[ids])), 0, 1)

Generation starts from every position unreliable (ids zeros, x zeros: the network does not
read the image while every position is masked) and returns the last x.

``mask_len[s] = clip(ceil(L * m((s + 1) / T)), 1, L)`` with ``m(r) = cos(pi/2 * r)`` or ``1 - r``,
and ``tau_s = tau0 * (1 - (s + 1) / T)`` (annealed) or ``tau0`` (static).

``denoise_step`` is the only place a step is computed; ``denoise`` runs a plan from a state
(image, ids, mask); ``sample_batch`` (generation), ``ADDPPipeline.fill`` (inpainting,
outpainting, uncropping), the CUDA-graph sampler (which captures ``sample_batch``) and the
step visualisation all run it.

Random numbers. All noise comes from ``generator`` (or torch's global RNG when None), drawn
by ``ops.gumbel_topk_unmask`` in this fixed order, so a re-implementation can reproduce a
run exactly:

    for each batch, for each step s:
        1. sampling noise  ops.gumbel(torch.rand((B, L, K), generator=generator, dtype=torch.float32))
        2. choice noise    ops.gumbel(torch.rand((B, L), generator=generator, dtype=torch.float64))

``ops.gumbel(u)`` is ``-log(-log(u))`` with u clamped below at the dtype's smallest normal
number. Sampling is Gumbel-max: ``argmax(logits + noise)`` (non-nucleus tokens get -inf
first when top_p < 1). The choice noise is float64 and scaled by tau in float64 before being
added to the float32 log-probability, as the official code does with numpy's float64 Gumbel
draws. Results therefore depend on ``batch_size`` (the batches draw one after another from
the same generator). A list of generators, one per image, gives image b the noise of its
own generator: the image a batch of one would give from it.

Noise is drawn on the generator's device and moved to the model's (the diffusers
convention): a CPU generator gives a CUDA model the noise of the CPU run, at the cost of
drawing B*L*K uniforms a step on the CPU and copying them to the GPU (docs/generation.md
gives the measured cost). A generator on the model's device costs nothing extra.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from .. import ops
from ..errors import AddpError
from .config import GenerationOutput, Generators, SamplerConfig
from .schedule import Schedule, Step

StepCallback = Callable[[int, Step, dict], Optional[dict]]
STATE_KEYS = ("image", "ids", "mask")


def denoise_step(net: nn.Module, tokenizer: nn.Module, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                 step: Step, top_p: float = 1.0, generator: Generators = None):
    """One alternating step (the module docstring's formulas): (x, ids, mask) -> the same after it.

    x (B, 3, H, W); ids (B, L) int64; mask (B, L) bool, True = unreliable, with
    ``step.num_reliable`` False in every row. Sampling, confidence and the choice of
    positions are the fused op ``ops.gumbel_topk_unmask``; the image is decoded from
    ``ops.codebook_weighted_sum``.
    """
    K = tokenizer.codebook.shape[0]
    if step.num_reliable == 0:
        # Every position unreliable: the network reads neither the image nor any token, so
        # every row gets the same logits. One row is computed and shared by the batch.
        logits = net(x[:1], ids[:1], mask[:1], 0)[..., :K].float().expand(x.shape[0], -1, -1)
    else:
        logits = net(x, ids, mask, step.num_reliable)[..., :K].float()  # (B, L, K)
    ids, mask = ops.gumbel_topk_unmask(logits, ids, mask, step.mask_len, step.temperature,
                                       generator=generator, top_p=top_p)
    emb = ops.codebook_weighted_sum(logits, tokenizer.codebook, ids, mask)  # (B, L, D)
    # NaN logits still sample ids and decode to a plausible image: mark the image instead (on
    # the device, no host sync), and keep it marked through the later steps
    finite = torch.isfinite(logits).all() & torch.isfinite(x).all()
    x = tokenizer.decode_embeddings(emb).clamp(0, 1)
    x = torch.where(finite, x, torch.full_like(x, float("nan")))
    return x, ids, mask


def check_finite_images(images: torch.Tensor) -> torch.Tensor:
    """`images` (the result of a denoising run) unless a step's logits were not finite."""
    if not bool(torch.isfinite(images).all()):
        raise AddpError("the network's predictions are not finite (NaN or Inf): its weights are broken, or its "
                        "activations overflow at this precision; no images were made")
    return images


def denoise(net: nn.Module, tokenizer: nn.Module, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
            steps: Sequence[Step], top_p: float = 1.0, generator: Generators = None,
            callback: Optional[StepCallback] = None):
    """Run ``steps`` (a ``Schedule.plan``) from the state (x, ids, mask); returns the state
    after the last step. Reads no tensor on the host (without a callback).

    callback(i, step, {"image": x, "ids": ids, "mask": mask}) runs after the i-th step of the
    run; it may return a dict replacing any of the three for the next step (a replaced mask
    must leave ``step.mask_len`` positions unreliable in every row).
    """
    for i, step in enumerate(steps):
        x, ids, mask = denoise_step(net, tokenizer, x, ids, mask, step, top_p, generator)
        if callback is not None:
            x, ids, mask = _replaced(callback(i, step, dict(zip(STATE_KEYS, (x, ids, mask)))), x, ids, mask, step)
    return x, ids, mask


def _replaced(new: Optional[dict], x, ids, mask, step: Step):
    """The state after a step callback: its returned tensors where it returned any, checked."""
    if not new:
        return x, ids, mask
    unknown = set(new) - set(STATE_KEYS)
    if unknown:
        raise AddpError(f"a step callback may return {STATE_KEYS}, got {sorted(unknown)}")
    out = []
    for key, old in zip(STATE_KEYS, (x, ids, mask)):
        value = new.get(key, old)
        if not isinstance(value, torch.Tensor) or value.shape != old.shape or value.dtype != old.dtype:
            raise AddpError(f"a step callback's {key!r} must be a {old.dtype} tensor of shape {tuple(old.shape)}")
        out.append(value.to(old.device))
    if "mask" in new and not bool((out[2].sum(1) == step.mask_len).all()):
        raise AddpError(f"a step callback's mask must leave {step.mask_len} positions unreliable in every row")
    return tuple(out)


def check_models(net: nn.Module, tokenizer: nn.Module) -> None:
    """Raise AddpError unless `net` is an ADDP network and `tokenizer` a VQ tokenizer, with the
    tokenizer's codebook the one the network predicts."""
    for value, kind, what in ((net, "addp", "net"), (tokenizer, "tokenizer", "tokenizer")):
        found = getattr(getattr(value, "config", None), "kind", None)
        if not isinstance(value, nn.Module) or found != kind:
            shown = f"a {found} model" if isinstance(value, nn.Module) and found else type(value).__name__
            raise AddpError(f"{what} must be {'an ADDP network' if kind == 'addp' else 'a VQ tokenizer'}, got {shown}")
    K, Kt = net.config.codebook_size, tokenizer.codebook.shape[0]
    if K != Kt:
        raise AddpError(f"the network predicts {K} codebook entries but the tokenizer has {Kt}")


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """Modules in eval mode for a ``with`` block; their training flags are restored after it."""
    flags = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.train(flag)


def check_generators(generator: Generators, num_images: int) -> None:
    """None, a torch.Generator, or a list of one per image."""
    many = generator if isinstance(generator, (list, tuple)) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in many):
        raise AddpError(f"generator must be a torch.Generator, a list of them or None, got "
                        f"{type(generator).__name__}")
    if isinstance(generator, (list, tuple)) and len(generator) != num_images:
        raise AddpError(f"got {len(generator)} generators for {num_images} images (give one, or one per image)")


def sample_batch(net: nn.Module, tokenizer: nn.Module, batch_size: int, config: SamplerConfig = SamplerConfig(),
                 generator: Generators = None, return_intermediates: bool = False,
                 callback: Optional[StepCallback] = None):
    """Generate one batch; ``net`` and ``tokenizer`` must already be in eval mode.

    Runs on the device of ``net``; ``generator``: one (any device), one per image, or None.
    Does not switch off autograd itself (``generate`` does). ``callback``: see ``denoise``.

    Returns images (B, 3, H, W) in [0, 1], or with ``return_intermediates`` a
    ``GenerationOutput`` whose lists hold one (B, ...) tensor per step.
    """
    check_models(net, tokenizer)
    check_generators(generator, batch_size)
    param = next(net.parameters())
    L, size = net.config.num_patches, net.config.image_size
    x = torch.zeros(batch_size, 3, size, size, device=param.device, dtype=param.dtype)
    ids = torch.zeros(batch_size, L, dtype=torch.long, device=param.device)
    mask = torch.ones(batch_size, L, dtype=torch.bool, device=param.device)
    out = GenerationOutput(images=x)
    if return_intermediates:
        callback = _recorder(out, callback)
    x, _, _ = denoise(net, tokenizer, x, ids, mask, Schedule(config, L).plan(), config.top_p, generator, callback)
    if not return_intermediates:
        return x
    out.images = x
    return out


def _recorder(out: GenerationOutput, callback: Optional[StepCallback]) -> StepCallback:
    """A step callback that runs ``callback`` and appends the resulting state to ``out``."""
    def record(i, step, state):
        new = callback(i, step, state) if callback is not None else None
        final = {**state, **(new or {})}
        out.step_images.append(final["image"])
        out.step_ids.append(final["ids"])
        out.step_masks.append(final["mask"])
        return new
    return record
