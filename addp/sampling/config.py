"""What a sampler run is asked to do: `SamplerConfig`, the named protocols of the official
release, and the shape of its results.

Two modes, otherwise identical:

* ``parity=True`` reproduces the official implementation (ChangyaoTian/ADDP,
  engine_generate.py) step by step, including its quirk at the last step: mask_len is
  clipped to 1 there too, so one position per image stays unreliable and the final image
  is decoded with that position's probability-weighted codebook sum (a soft token).
* ``parity=False`` (default) sets mask_len = 0 at the last step: every position ends
  reliable and the final image is decoded from hard tokens only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Union

import torch

from ..errors import AddpError

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
    parity: what the last step does. True: as the official code, one position per image
        stays unreliable, so the final image decodes it from its probability-weighted
        codebook sum (a soft token). False (default): every position ends reliable and the
        final image is decoded from hard tokens only.
    """

    steps: int = 20
    schedule: str = "cosine"
    temperature: float = 6.0
    temperature_schedule: str = "annealed"
    top_p: float = 1.0
    parity: bool = False

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise AddpError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.schedule not in SCHEDULES:
            raise AddpError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise AddpError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.temperature_schedule not in TEMPERATURE_SCHEDULES:
            raise AddpError(f"temperature_schedule must be one of {TEMPERATURE_SCHEDULES}, "
                             f"got {self.temperature_schedule!r}")
        if not 0 < self.top_p <= 1:
            raise AddpError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.parity, bool):
            raise AddpError(f"parity must be True or False, got {self.parity!r}")


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
        raise AddpError("give a config or a protocol, not both")
    if config is not None and not isinstance(config, SamplerConfig):
        raise AddpError(f"config must be a SamplerConfig, got {type(config).__name__}")
    if protocol is not None and protocol not in SAMPLER_PROTOCOLS:
        raise AddpError(f"protocol must be one of {tuple(SAMPLER_PROTOCOLS)}, got {protocol!r}")
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
