"""The sampler's schedule: how many positions stay unreliable after each step, the Gumbel scale
of each step, and the plan of `Step`s to run (also from part-way, for inpainting).

``mask_len[s] = clip(ceil(L * m((s + 1) / T)), 1, L)`` with ``m(r) = cos(pi/2 * r)`` or ``1 - r``,
and ``tau_s = tau0 * (1 - (s + 1) / T)`` (annealed) or ``tau0`` (static). The parity flag
(`SamplerConfig.parity`) keeps the official last step: mask_len clipped to 1 there too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .config import SCHEDULES, SamplerConfig


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
