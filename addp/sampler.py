"""Alternating denoising generation: pixels -> token distribution -> pixels, T steps.

Every step (s = 0 .. T-1), with L token positions and a K-entry codebook:

    logits   = net(x, ids, mask, num_reliable)[..., :K]                (B, L, K)
    sampled  = categorical(softmax(logits)) at every position          (optionally top-p)
    ids      = where(mask, sampled, ids)             reliable tokens never change
    conf     = log p(sampled) + tau_s * Gumbel,  +inf at reliable positions
    mask     = the mask_len[s] lowest-confidence positions of each row
    x        = clamp(decode(where(mask, softmax(logits) @ codebook, codebook[ids])), 0, 1)

It starts from every position unreliable (ids zeros, x zeros: the network does not read the
image while every position is masked) and returns the last x.

``mask_len[s] = clip(ceil(L * m((s + 1) / T)), 1, L)`` with ``m(r) = cos(pi/2 * r)`` or ``1 - r``,
and ``tau_s = tau0 * (1 - (s + 1) / T)`` (annealed) or ``tau0`` (static).

Two modes, otherwise identical:

* ``parity=True`` reproduces the official implementation (ChangyaoTian/ADDP,
  engine_generate.py) step by step, including its quirk at the last step: mask_len is
  clipped to 1 there too, so one position per image stays unreliable and the final image
  is decoded with that position's probability-weighted codebook sum (a soft token).
* ``parity=False`` (default) sets mask_len = 0 at the last step: every position ends
  reliable and the final image is decoded from hard tokens only.

Random numbers. All noise comes from ``generator`` (or torch's global RNG when None), drawn
in this fixed order, so a re-implementation can reproduce a run exactly:

    for each batch, for each step s:
        1. sampling noise  gumbel_noise((B, L, K), generator, torch.float32)
        2. choice noise    gumbel_noise((B, L), generator, torch.float64)

``gumbel_noise`` is ``-log(-log(u))`` with ``u = torch.rand(shape, dtype)`` clamped below at
the dtype's smallest normal number. Sampling is Gumbel-max: ``argmax(logits + noise)``
(non-nucleus tokens get -inf first when top_p < 1). The choice noise is float64 and scaled by
tau in float64 before being added to the float32 log-probability, as the official code does
with numpy's float64 Gumbel draws. Results therefore depend on ``batch_size`` (the batches
draw one after another from the same generator).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from . import ops

SCHEDULES = ("cosine", "linear")
TEMPERATURE_SCHEDULES = ("annealed", "static")


@dataclass(frozen=True)
class SamplerConfig:
    """Options of the alternating denoising sampler (see the module docstring).

    steps: number of denoising steps T >= 1.
    schedule: mask schedule m(r): "cosine" (cos(pi/2 r)) or "linear" (1 - r).
    temperature: tau0 >= 0, the Gumbel noise scale of the choice of positions to fix.
    temperature_schedule: "annealed" (tau0 * (1 - (s+1)/T), the official `dynamic`) or "static".
    top_p: nucleus sampling of candidate ids when < 1; 1 samples from the full distribution.
    parity: True reproduces the official last step (one soft position left); False ends
        with every position reliable.
    """

    steps: int = 20
    schedule: str = "cosine"
    temperature: float = 6.0
    temperature_schedule: str = "annealed"
    top_p: float = 1.0
    parity: bool = False

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.temperature_schedule not in TEMPERATURE_SCHEDULES:
            raise ValueError(f"temperature_schedule must be one of {TEMPERATURE_SCHEDULES}, "
                             f"got {self.temperature_schedule!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


# Named sampler settings of the official release (ChangyaoTian/ADDP generation scripts).
# "paper-steps256" is the paper's FID protocol (Tab. 1).
SAMPLER_PROTOCOLS: dict[str, SamplerConfig] = {
    "paper-steps20": SamplerConfig(steps=20, schedule="cosine", temperature=6.0,
                                   temperature_schedule="annealed", parity=True),
    "paper-steps256": SamplerConfig(steps=256, schedule="linear", temperature=6.0,
                                    temperature_schedule="annealed", parity=True),
}


@dataclass
class GenerationOutput:
    """Result of ``generate(..., return_intermediates=True)``.

    images: (N, 3, H, W) in [0, 1], the final images.
    step_images: T tensors (N, 3, H, W), the image x after each step (the last is `images`).
    step_masks: T bool tensors (N, L), True = still unreliable after the step.
    step_ids: T int64 tensors (N, L), the ids after the step (candidates where unreliable).
    """

    images: torch.Tensor
    step_images: list[torch.Tensor] = field(default_factory=list)
    step_masks: list[torch.Tensor] = field(default_factory=list)
    step_ids: list[torch.Tensor] = field(default_factory=list)


# --------------------------------------------------------------------------- schedules
def mask_schedule(num_tokens: int, steps: int, schedule: str = "cosine", parity: bool = False) -> list[int]:
    """Number of positions left unreliable after each step: a list of ``steps`` ints.

    ``clip(ceil(L * m((s+1)/T)), 1, L)`` for s = 0..T-1, the same float arithmetic as the
    official code; with ``parity=False`` the last entry is 0 instead of the official 1.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if steps < 1 or num_tokens < 1:
        raise ValueError(f"need steps >= 1 and num_tokens >= 1, got {steps} and {num_tokens}")
    out = []
    for s in range(steps):
        r = 1.0 * (s + 1) / steps
        ratio = math.cos(math.pi / 2.0 * r) if schedule == "cosine" else 1.0 - r
        out.append(min(max(math.ceil(num_tokens * ratio), 1), num_tokens))
    if not parity:
        out[-1] = 0
    return out


def choice_temperatures(config: SamplerConfig) -> list[float]:
    """The Gumbel scale tau_s of each step s = 0..T-1 (a list of ``config.steps`` floats)."""
    T, tau0 = config.steps, config.temperature
    if config.temperature_schedule == "static":
        return [tau0] * T
    return [tau0 * (1 - 1.0 * (s + 1) / T) for s in range(T)]


# --------------------------------------------------------------------------- sampling helpers
def gumbel_noise(shape, generator: Optional[torch.Generator] = None, dtype=torch.float32,
                 device=None) -> torch.Tensor:
    """Standard Gumbel noise of ``shape``: ``-log(-log(u))``, u uniform from ``generator``.

    u is clamped below at the smallest normal float, so the noise is finite (a zero
    temperature times the noise is 0, never NaN).
    """
    u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(dtype).tiny)))


def nucleus_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """(..., K) logits -> (..., K) bool, True for tokens in the top-p nucleus.

    The nucleus is the smallest prefix of the probabilities sorted in descending order whose
    sum reaches ``top_p``; the most likely token is always in it.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above
    keep_sorted = mass_before < top_p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def sample_ids(logits: torch.Tensor, noise: torch.Tensor, top_p: float = 1.0) -> torch.Tensor:
    """Gumbel-max sampling: (..., K) logits and (..., K) Gumbel noise -> (...) int64 ids.

    With ``top_p < 1`` only tokens of the nucleus (``nucleus_mask``) can be drawn; with
    ``top_p == 1`` it samples from ``softmax(logits)`` with the very same noise.
    """
    scores = logits.float()
    if top_p < 1:
        scores = scores.masked_fill(~nucleus_mask(scores, top_p), float("-inf"))
    return torch.argmax(scores + noise, dim=-1)


def sample_categorical(logits: torch.Tensor, generator: Optional[torch.Generator] = None,
                       top_p: float = 1.0) -> torch.Tensor:
    """(..., K) logits -> (...) int64 ids drawn from softmax(logits) (top-p when < 1)."""
    noise = gumbel_noise(logits.shape, generator, torch.float32, logits.device)
    return sample_ids(logits, noise, top_p)


def lowest_confidence_mask(confidence: torch.Tensor, mask_len: int) -> torch.Tensor:
    """(B, L) confidence -> (B, L) bool, True at the ``mask_len`` lowest values of each row."""
    out = torch.zeros_like(confidence, dtype=torch.bool)
    if mask_len == 0:
        return out
    idx = torch.topk(confidence, k=mask_len, dim=-1, largest=False).indices
    return out.scatter(-1, idx, True)


# --------------------------------------------------------------------------- the sampler
def _denoise_step(net, tokenizer, x, ids, mask, num_reliable: int, mask_len: int, tau: float,
                  top_p: float, generator):
    """One alternating step: (x, ids, mask) -> (x_next, ids_next, mask_next).

    Sampling, confidence and the choice of positions are the fused op
    ``ops.gumbel_topk_unmask`` (its reference is the plain-PyTorch definition); it draws
    the noise in the order documented above.
    """
    K = tokenizer.codebook.shape[0]
    if num_reliable == 0:
        # Every position unreliable: the network reads neither the image nor any token, so
        # every row gets the same logits. One row is computed and shared by the batch.
        logits = net(x[:1], ids[:1], mask[:1], 0)[..., :K].float().expand(x.shape[0], -1, -1)
    else:
        logits = net(x, ids, mask, num_reliable)[..., :K].float()  # (B, L, K)
    ids, mask = ops.gumbel_topk_unmask(logits, ids, mask, mask_len, tau, generator=generator, top_p=top_p)
    emb = ops.codebook_weighted_sum(logits, tokenizer.codebook, ids, mask)  # (B, L, D)
    x = tokenizer.decode_embeddings(emb).clamp(0, 1)
    return x, ids, mask


def _check_models(net, tokenizer) -> None:
    K, Kt = net.config.codebook_size, tokenizer.codebook.shape[0]
    if K != Kt:
        raise ValueError(f"the network predicts {K} codebook entries but the tokenizer has {Kt}")


def sample_batch(net: nn.Module, tokenizer: nn.Module, batch_size: int, config: SamplerConfig = SamplerConfig(),
                 generator: Optional[torch.Generator] = None, return_intermediates: bool = False):
    """Generate one batch; ``net`` and ``tokenizer`` must already be in eval mode.

    Runs on the device of ``net`` (``generator``, if given, must be on that device). Does not
    switch off autograd itself (``generate`` does).

    Returns images (B, 3, H, W) in [0, 1], or with ``return_intermediates`` a
    ``GenerationOutput`` whose lists hold one (B, ...) tensor per step.
    """
    _check_models(net, tokenizer)
    device = next(net.parameters()).device
    L, size = net.config.num_patches, net.config.image_size
    x = torch.zeros(batch_size, 3, size, size, device=device)
    ids = torch.zeros(batch_size, L, dtype=torch.long, device=device)
    mask = torch.ones(batch_size, L, dtype=torch.bool, device=device)
    out = GenerationOutput(images=x)
    num_reliable = 0
    lengths = mask_schedule(L, config.steps, config.schedule, config.parity)
    for mask_len, tau in zip(lengths, choice_temperatures(config)):
        x, ids, mask = _denoise_step(net, tokenizer, x, ids, mask, num_reliable, mask_len, tau,
                                     config.top_p, generator)
        num_reliable = L - mask_len  # known from the schedule: no host sync
        if return_intermediates:
            out.step_images.append(x)
            out.step_masks.append(mask)
            out.step_ids.append(ids)
    if not return_intermediates:
        return x
    out.images = x
    return out


class _EvalMode:
    """Puts modules in eval mode for a ``with`` block and restores their training flags."""

    def __init__(self, *modules: nn.Module):
        self.modules = modules

    def __enter__(self):
        self.flags = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc):
        for m, flag in zip(self.modules, self.flags):
            m.train(flag)


class _CompiledNet(nn.Module):
    """An ADDP network with a compiled pixel encoder and a compiled token decoder; the
    decoder's sequence length changes with the number of reliable tokens at every step, so
    it is compiled for dynamic shapes (one graph for all steps)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.config = net, net.config
        self.encoder = torch.compile(net.forward_encoder)
        self.decoder = torch.compile(net.forward_decoder, dynamic=True)

    def forward(self, x, ids, mask, num_reliable=None):
        return self.decoder(self.encoder(x), ids, mask, num_reliable)


class _CompiledTokenizer(nn.Module):
    """A VQ tokenizer whose decoder (fixed shapes for a batch size) is compiled."""

    def __init__(self, tokenizer: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer
        self.decode = torch.compile(tokenizer.decode_embeddings)

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
    decoder (dynamic shapes) and the tokenizer's decoder. Other networks are compiled whole."""
    cache = _cache(net)
    key = ("compiled", id(tokenizer))
    if key not in cache or cache[key][1].tokenizer is not tokenizer:
        split = hasattr(net, "forward_encoder") and net.config.token_input != "encoder_decoder"
        fast_net = _CompiledNet(net) if split else torch.compile(net)
        cache[key] = (fast_net, _CompiledTokenizer(tokenizer))
    return cache[key]


class CudaGraphSampler:
    """``sample_batch`` for one (network, tokenizer, batch size, config), captured as one
    CUDA graph and replayed: the T steps launch as a single graph, with no Python between
    kernels. Shapes are static (every step's mask_len and number of reliable tokens is
    fixed by the schedule), and the noise comes from a private generator registered with
    the graph. Each call copies the caller's generator state into it, replays, and advances
    the caller's generator by what the eager sampler would have drawn, so for the same
    generator state the replay computes exactly what ``sample_batch`` computes.

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
        with torch.cuda.stream(side), torch.no_grad():  # compiles Triton kernels, picks cuDNN algorithms
            self._run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.graph.register_generator_state(self.generator)
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.images = self._run()

    def _run(self) -> torch.Tensor:
        return sample_batch(self.net, self.tokenizer, self.batch_size, self.config, self.generator)

    def __call__(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One batch (B, 3, H, W) drawn from ``generator`` (None: the device's default generator)."""
        device = self.images.device
        source = generator if generator is not None else torch.cuda.default_generators[device.index or 0]
        self.generator.set_state(source.get_state())
        self.graph.replay()
        source.set_state(self.generator.get_state())
        return self.images.clone()


def graphed_sampler(net: nn.Module, tokenizer: nn.Module, batch_size: int, config: SamplerConfig) -> CudaGraphSampler:
    """The ``CudaGraphSampler`` for these arguments, captured on first use and cached on the net."""
    cache = _cache(net)
    # a graph replays the kernels it captured: autocast at capture time is part of the key
    autocast = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda")
    key = ("graph", id(tokenizer), batch_size, config, autocast)
    if key not in cache or cache[key].tokenizer is not tokenizer:
        cache[key] = CudaGraphSampler(net, tokenizer, batch_size, config)
    return cache[key]


def generate(net: nn.Module, tokenizer: nn.Module, num_images: int, config: SamplerConfig = SamplerConfig(),
             generator: Optional[torch.Generator] = None, batch_size: Optional[int] = None,
             return_intermediates: bool = False, progress: bool = False, cuda_graph: Optional[bool] = None,
             compile: bool = False):
    """Generate ``num_images`` images with the alternating denoising process.

    Args:
        net: an ADDP network; ``tokenizer``: the VQ tokenizer with the same codebook size.
            Both run in eval mode (their training flags are restored afterwards) under
            ``torch.no_grad``, on the device of ``net``.
        num_images: N >= 1.
        config: the sampler options.
        generator: source of all randomness (on the device of ``net``); None = torch's global RNG.
        batch_size: images per batch (default: all N in one batch).
        return_intermediates: also return every step's images, masks and ids.
        progress: show a tqdm bar over batches.
        cuda_graph: replay each batch size's T steps as one captured CUDA graph
            (``CudaGraphSampler``; same images as eager). None = on for CUDA devices unless
            ``return_intermediates``; True off CUDA is an error.
        compile: torch.compile the networks (the ADDP pixel encoder, its token decoder and
            the tokenizer's decoder; ``compiled_models``). The first batch pays the compilation.

    Returns:
        images (N, 3, H, W) in [0, 1], or a ``GenerationOutput`` with lists of T tensors
        (N, 3, H, W) / (N, L) / (N, L) when ``return_intermediates``.
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    batch_size = num_images if batch_size is None else batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    on_cuda = next(net.parameters()).device.type == "cuda"
    if cuda_graph and not on_cuda:
        raise ValueError("cuda_graph=True needs the network on a CUDA device")
    if cuda_graph and return_intermediates:
        raise ValueError("cuda_graph=True cannot return intermediates (the graph keeps only the final images)")
    use_graph = (on_cuda and not return_intermediates) if cuda_graph is None else cuda_graph
    sizes = [min(batch_size, num_images - i) for i in range(0, num_images, batch_size)]
    if progress:
        from tqdm.auto import tqdm
        sizes = tqdm(sizes, desc="generating", unit="batch")
    with torch.no_grad(), _EvalMode(net, tokenizer):
        if compile:
            net, tokenizer = compiled_models(net, tokenizer)
        if use_graph:
            results = [graphed_sampler(net, tokenizer, b, config)(generator) for b in sizes]
        else:
            results = [sample_batch(net, tokenizer, b, config, generator, return_intermediates) for b in sizes]
    if not return_intermediates:
        return torch.cat(results)
    return GenerationOutput(
        images=torch.cat([r.images for r in results]),
        step_images=[torch.cat(t) for t in zip(*(r.step_images for r in results))],
        step_masks=[torch.cat(t) for t in zip(*(r.step_masks for r in results))],
        step_ids=[torch.cat(t) for t in zip(*(r.step_ids for r in results))],
    )


# --------------------------------------------------------------------------- visualisation
@torch.no_grad()
def token_embedding_pca(net: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Paper Fig. 16: ids (B, L) in [0, K) -> images (B, 3, h, w) in [0, 1], h = w = sqrt(L).

    Each token's ADDP embedding (``net.token_emb``) is projected on the first 3 principal
    components of the K codebook rows of the embedding table; each component is min-max
    normalised over the K codebook rows, so colours are comparable across images and steps.
    """
    K = net.config.codebook_size
    table = net.token_emb.weight[:K].float()  # (K, D)
    mean = table.mean(0)
    _, _, vh = torch.linalg.svd(table - mean, full_matrices=False)
    components = vh[:3].T  # (D, 3)
    proj_codebook = (table - mean) @ components  # (K, 3)
    lo, hi = proj_codebook.min(0).values, proj_codebook.max(0).values
    proj = proj_codebook[ids]  # (B, L, 3): a row of the table per id
    proj = ((proj - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    B, L = ids.shape
    side = math.isqrt(L)
    if side * side != L:
        raise ValueError(f"{L} tokens do not form a square grid")
    return proj.transpose(1, 2).reshape(B, 3, side, side)
