"""Alternating denoising generation: pixels -> token distribution -> pixels, T steps.

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

The parts, split as diffusers splits ``AmusedScheduler`` from its pipelines:

* ``Schedule``: for a config and L positions, the mask lengths, the temperatures, and the
  step to start from when only some positions are unknown (inpainting); ``Schedule.plan``
  lists the ``Step``s to run.
* ``denoise_step``: one step, the formulas above; the only place a step is computed.
* ``denoise``: runs a plan from a state (image, ids, mask). ``sample_batch`` (generation),
  ``ADDPPipeline.fill`` (inpainting, outpainting, uncropping), ``CudaGraphSampler`` (which
  captures ``sample_batch``) and the step visualisation all run it.

Two modes, otherwise identical:

* ``parity=True`` reproduces the official implementation (ChangyaoTian/ADDP,
  engine_generate.py) step by step, including its quirk at the last step: mask_len is
  clipped to 1 there too, so one position per image stays unreliable and the final image
  is decoded with that position's probability-weighted codebook sum (a soft token).
* ``parity=False`` (default) sets mask_len = 0 at the last step: every position ends
  reliable and the final image is decoded from hard tokens only.

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
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from . import ops
from .frozen import compile_frozen, weights_version

SCHEDULES = ("cosine", "linear")
TEMPERATURE_SCHEDULES = ("annealed", "static")

Generators = Union[torch.Generator, Sequence[torch.Generator], None]


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
        if not isinstance(self.parity, bool):
            raise ValueError(f"parity must be True or False, got {self.parity!r}")


# Named sampler settings of the official release (ChangyaoTian/ADDP, configs/release/*/
# generate_addp_*.sh with main_generate.py's defaults: choice temperature 6.0, `dynamic`
# temperature, plain categorical sampling). "paper-steps256" is the paper's FID protocol (Tab. 1).
SAMPLER_PROTOCOLS: dict[str, SamplerConfig] = {
    "paper-steps20": SamplerConfig(steps=20, schedule="cosine", temperature=6.0,
                                   temperature_schedule="annealed", parity=True),
    "paper-steps256": SamplerConfig(steps=256, schedule="linear", temperature=6.0,
                                    temperature_schedule="annealed", parity=True),
}


def sampler_config(config: Optional[SamplerConfig] = None, protocol: Optional[str] = None,
                   **options) -> SamplerConfig:
    """The config to run: ``config``, else the named ``protocol`` (a key of
    SAMPLER_PROTOCOLS), else the defaults; every option given (not None) replaces its field,
    e.g. ``sampler_config(protocol="paper-steps256", steps=64)``."""
    if config is not None and protocol is not None:
        raise ValueError("give a config or a protocol, not both")
    if protocol is not None and protocol not in SAMPLER_PROTOCOLS:
        raise ValueError(f"protocol must be one of {tuple(SAMPLER_PROTOCOLS)}, got {protocol!r}")
    base = config if config is not None else SAMPLER_PROTOCOLS[protocol] if protocol is not None else SamplerConfig()
    given = {k: v for k, v in options.items() if v is not None}
    return replace(base, **given) if given else base


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


# --------------------------------------------------------------------------- the schedule
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


@dataclass(frozen=True)
class Step:
    """One denoising step of a plan.

    index: s in [0, T), the step of the schedule.
    timestep: T - 1 - s, counting down to 0 at the last step (diffusers' ``timesteps``).
    num_reliable: reliable positions entering the step (the same in every row).
    mask_len: positions left unreliable after it.
    temperature: tau_s, the Gumbel scale of the choice of positions.
    """

    index: int
    timestep: int
    num_reliable: int
    mask_len: int
    temperature: float


class Schedule:
    """The schedule of a sampler config over ``num_tokens`` positions.

    mask_lengths[s]: positions left unreliable after step s (``mask_schedule``).
    temperatures[s]: tau_s (``choice_temperatures``).
    """

    def __init__(self, config: SamplerConfig, num_tokens: int):
        self.config, self.num_tokens = config, num_tokens
        self.mask_lengths = mask_schedule(num_tokens, config.steps, config.schedule, config.parity)
        self.temperatures = choice_temperatures(config)

    def start_step(self, unreliable: int) -> int:
        """The step to start from with ``unreliable`` of the L positions unknown: the last s
        whose input still has at least that many unreliable positions. Step s's input has
        ``ceil(L * m(s / T))`` of them: L at s = 0, then ``mask_lengths[s - 1]`` (the clip
        and the parity flag never act before the last step)."""
        if not 0 <= unreliable <= self.num_tokens:
            raise ValueError(f"unreliable must be in [0, {self.num_tokens}], got {unreliable}")
        entering = [self.num_tokens] + self.mask_lengths[:-1]
        return max(s for s, n in enumerate(entering) if n >= unreliable)

    def plan(self, unreliable: Optional[int] = None) -> list[Step]:
        """The steps to run: from step 0 with every position unreliable (None: generation),
        or from ``start_step(unreliable)`` with ``unreliable`` positions unknown; positions
        known at the start stay reliable (mask_len never exceeds the unknown count)."""
        L, T = self.num_tokens, self.config.steps
        start = 0 if unreliable is None else self.start_step(unreliable)
        left = L if unreliable is None else unreliable
        steps = []
        for s in range(start, T):
            mask_len = min(self.mask_lengths[s], left)
            steps.append(Step(s, T - 1 - s, L - left, mask_len, self.temperatures[s]))
            left = mask_len
        return steps


# --------------------------------------------------------------------------- the step
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
    x = tokenizer.decode_embeddings(emb).clamp(0, 1)
    return x, ids, mask


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
        raise ValueError(f"a step callback may return {STATE_KEYS}, got {sorted(unknown)}")
    out = []
    for key, old in zip(STATE_KEYS, (x, ids, mask)):
        value = new.get(key, old)
        if not isinstance(value, torch.Tensor) or value.shape != old.shape or value.dtype != old.dtype:
            raise ValueError(f"a step callback's {key!r} must be a {old.dtype} tensor of shape {tuple(old.shape)}")
        out.append(value.to(old.device))
    if "mask" in new and not bool((out[2].sum(1) == step.mask_len).all()):
        raise ValueError(f"a step callback's mask must leave {step.mask_len} positions unreliable in every row")
    return tuple(out)


def check_models(net: nn.Module, tokenizer: nn.Module) -> None:
    """Raise ValueError unless the network predicts the tokenizer's codebook."""
    K, Kt = net.config.codebook_size, tokenizer.codebook.shape[0]
    if K != Kt:
        raise ValueError(f"the network predicts {K} codebook entries but the tokenizer has {Kt}")


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
    """A list of generators must hold one per image."""
    if isinstance(generator, (list, tuple)) and len(generator) != num_images:
        raise ValueError(f"got {len(generator)} generators for {num_images} images (give one, or one per image)")


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
        self.tokenizer = tokenizer
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
    On CPUs the graphs are frozen (``addp.frozen``): when a weight of either network has changed
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


def generate(net: nn.Module, tokenizer: nn.Module, num_images: int, config: Optional[SamplerConfig] = None,
             generator: Generators = None, batch_size: Optional[int] = None, return_intermediates: bool = False,
             progress: bool = False, cuda_graph: Optional[bool] = None, compile: bool = False,
             callback: Optional[StepCallback] = None, *, protocol: Optional[str] = None,
             steps: Optional[int] = None, schedule: Optional[str] = None, temperature: Optional[float] = None,
             temperature_schedule: Optional[str] = None, top_p: Optional[float] = None,
             parity: Optional[bool] = None):
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
        progress: show a tqdm bar over batches.
        cuda_graph: replay each batch size's T steps as one captured CUDA graph
            (``CudaGraphSampler``; same images as eager for a CUDA generator). None = on for
            CUDA devices unless ``return_intermediates``, a callback or a list of generators
            asks for the eager loop; True off CUDA is an error.
        compile: torch.compile the networks (the ADDP pixel encoder, its token decoder and
            the tokenizer's decoder; ``compiled_models``). The first batch pays the compilation.
        callback: called after every step of every batch (``denoise``).

    Returns:
        images (N, 3, H, W) in [0, 1], or a ``GenerationOutput`` with lists of T tensors
        (N, 3, H, W) / (N, L) / (N, L) when ``return_intermediates``.
    """
    config = sampler_config(config, protocol, steps=steps, schedule=schedule, temperature=temperature,
                            temperature_schedule=temperature_schedule, top_p=top_p, parity=parity)
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    batch_size = num_images if batch_size is None else batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    check_generators(generator, num_images)
    per_image = isinstance(generator, (list, tuple))
    on_cuda = next(net.parameters()).device.type == "cuda"
    if cuda_graph and not on_cuda:
        raise ValueError("cuda_graph=True needs the network on a CUDA device")
    eager_only = return_intermediates or callback is not None or per_image
    if cuda_graph and eager_only:
        raise ValueError("cuda_graph=True cannot return intermediates, call a step callback or take a list "
                         "of generators (the graph keeps only the final images of one generator)")
    use_graph = (on_cuda and not eager_only) if cuda_graph is None else cuda_graph
    starts = range(0, num_images, batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="generating", unit="batch")
    results = []
    with torch.no_grad(), eval_mode(net, tokenizer):
        if compile:
            net, tokenizer = compiled_models(net, tokenizer)
        for start in starts:
            b = min(batch_size, num_images - start)
            g = generator[start:start + b] if per_image else generator
            if use_graph:
                results.append(graphed_sampler(net, tokenizer, b, config)(g))
            else:
                results.append(sample_batch(net, tokenizer, b, config, g, return_intermediates, callback))
    if not return_intermediates:
        return torch.cat(results)
    return GenerationOutput(
        images=torch.cat([r.images for r in results]),
        step_images=[torch.cat(t) for t in zip(*(r.step_images for r in results))],
        step_masks=[torch.cat(t) for t in zip(*(r.step_masks for r in results))],
        step_ids=[torch.cat(t) for t in zip(*(r.step_ids for r in results))],
    )


def clear_cache(net: nn.Module) -> None:
    """Drop the compiled parts and CUDA graphs cached on ``net``: needed after its parameters
    are replaced (``net.to(other device or dtype)``), since a graph reads them in place."""
    _cache(net).clear()
