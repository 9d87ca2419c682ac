"""The ADDP diffusion process: how one training sample (x_t, target) is built from an image.

Per batch:
  1. z0 = tokenizer.encode(x)
  2. a mask-ratio index i is drawn on a discrete grid weighted by a truncated normal, and
     i_next = min(i + U{1..5}, last); mask_t and mask_{t+1} mask ceil(L r_i) and
     ceil(L r_next) positions from one noise draw, so mask_{t+1} contains mask_t
  3. the token predictor, conditioned on the reliable tokens of t+1, gives distributions
     that a mapping function turns into embeddings for the unreliable positions of t
  4. x_t = tokenizer.decode(where(mask_t, mapped, codebook[z0]))
  5. target: the predictor's distribution conditioned on the reliable tokens of t, on mask_t
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import ops
from ..runtime.frozen import compile_frozen

MAPPINGS = ("weighted_sum", "argmax", "sample")
CONDITIONS = ("next", "same")  # predictor input condition: reliable tokens of t+1 (paper) or of t
MASKINGS = ("default", "fixed")


@dataclass(frozen=True)
class DiffusionConfig:
    mapping: str = "weighted_sum"
    condition: str = "next"
    masking: str = "default"
    ratio_min: float = 0.5
    ratio_max: float = 1.0
    ratio_mu: float = 0.55
    ratio_std: float = 0.25
    grid_steps: int = 100
    max_offset: int = 5  # i_next = i + U{1..max_offset}
    fixed_ratio: float = 0.5  # masking="fixed": mask_t always masks this fraction
    # > 0: the frozen predictor's dropout layers run in training mode with this rate in both
    # of its passes, as in the official pretraining (which puts the whole model, predictor
    # included, in train mode every epoch; MAGE's rate is 0.1). 0: the predictor runs in eval mode.
    predictor_dropout: float = 0.0

    def __post_init__(self):
        for value, allowed, what in ((self.mapping, MAPPINGS, "mapping"), (self.condition, CONDITIONS, "condition"),
                                     (self.masking, MASKINGS, "masking")):
            if value not in allowed:
                raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
        if not 0 <= self.predictor_dropout < 1:
            raise ValueError(f"predictor dropout must be in [0, 1), got {self.predictor_dropout}")
        if not 0 < self.ratio_min < self.ratio_max <= 1:
            raise ValueError(f"mask ratios need 0 < min < max <= 1, got {self.ratio_min}, {self.ratio_max}")


def mask_ratio_grid(c: DiffusionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The discrete ratio grid (ascending) and its truncated-normal sampling weights."""
    steps = torch.arange(c.grid_steps + 1, dtype=torch.float64) / c.grid_steps
    ratios = torch.cos(math.pi / 2 * steps).clamp(0, 1)
    ratios = ratios[(ratios >= c.ratio_min) & (ratios < c.ratio_max)].flip(0)
    # A truncated normal's pdf inside its support is the normal pdf up to a constant.
    pdf = torch.exp(-0.5 * ((ratios - c.ratio_mu) / c.ratio_std) ** 2)
    return ratios, pdf / pdf.sum()


def _rand(shape, device, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform noise drawn on the generator's device (a CPU generator can feed a GPU run)."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, device=generator.device, generator=generator).to(device)


@dataclass
class MaskPair:
    mask_t: torch.Tensor  # (B, L) bool, True = unreliable at step t
    mask_next: torch.Tensor  # (B, L) bool, superset of mask_t (step t+1 is noisier)
    num_masked: int
    num_masked_next: int


class MaskSchedule:
    """Draws nested (mask_t, mask_{t+1}) pairs. Ratio indices are drawn on the host from a
    CPU generator, so counts are Python ints and no device synchronisation is needed."""

    def __init__(self, config: DiffusionConfig, seq_len: int):
        self.config, self.seq_len = config, seq_len
        self.ratios, self.probs = mask_ratio_grid(config)
        if len(self.ratios) == 0:
            raise ValueError("the mask-ratio grid is empty for these ratio bounds")

    def count(self, index: int) -> int:
        return math.ceil(self.seq_len * float(self.ratios[index]))

    def draw_indices(self, generator: torch.Generator | None = None) -> tuple[int, int]:
        c, last = self.config, len(self.ratios) - 1
        if c.masking == "fixed":
            i = int((self.ratios - c.fixed_ratio).abs().argmin())
        else:
            i = int(torch.multinomial(self.probs, 1, generator=generator))
        offset = int(torch.randint(1, c.max_offset + 1, (1,), generator=generator))
        return i, min(i + offset, last)

    def draw(self, batch: int, device, generator: torch.Generator | None = None,
             noise_generator: torch.Generator | None = None) -> MaskPair:
        i, j = self.draw_indices(generator)
        return self.masks_at(i, j, batch, device, noise_generator)

    def masks_at(self, i: int, j: int, batch: int, device, noise_generator=None) -> MaskPair:
        """Nested masks for grid indices i <= j, each row from its own noise draw."""
        n_t = math.ceil(self.seq_len * self.config.fixed_ratio) if self.config.masking == "fixed" else self.count(i)
        n_next = max(self.count(j), n_t)
        noise = _rand((batch, self.seq_len), device, noise_generator)
        rank = noise.argsort(dim=1).argsort(dim=1)  # 0 = smallest noise = masked first
        return MaskPair(rank < n_t, rank < n_next, n_t, n_next)


@dataclass
class TrainingSample:
    x_t: torch.Tensor  # (B, 3, H, W) the noisy image the network sees
    ids: torch.Tensor  # (B, L) z0, the clean tokens (reliable ones are the decoder's token input)
    mask: torch.Tensor  # (B, L) bool mask_t: where the loss is taken
    mask_next: torch.Tensor  # (B, L) bool mask_{t+1}: the condition of the input mapping
    num_reliable: int  # L - |mask_t|, the same for every row
    target: torch.Tensor  # (B, L, K) fp32 soft target q(z_t-1 | z_t) (zeros where not masked)


class DiffusionProcess(nn.Module):
    """Builds training samples from images with a frozen tokenizer and token predictor."""

    def __init__(self, tokenizer: nn.Module, predictor: nn.Module, config: DiffusionConfig = DiffusionConfig()):
        super().__init__()
        K = tokenizer.config.codebook_size
        if predictor.config.codebook_size != K:
            raise ValueError(f"the tokenizer's codebook has {K} entries but the token predictor "
                             f"predicts {predictor.config.codebook_size}")
        self.tokenizer, self.predictor, self.config = tokenizer.eval(), predictor.eval(), config
        for p in self.parameters():
            p.requires_grad_(False)
        self.predictor_dropout = _dropout_layers(predictor, config.predictor_dropout)
        self.train(False)
        self.schedule = MaskSchedule(config, predictor.config.seq_len)
        self._encode, self._predict, self._decode = tokenizer.encode, predictor.forward, tokenizer.decode_embeddings

    def compile(self, **options) -> "DiffusionProcess":
        """torch.compile the frozen networks' passes (their shapes are fixed by the batch size,
        so they compile once; on CPUs with their weights frozen into the graphs, ``addp.runtime.frozen``)."""
        self._encode = compile_frozen(self.tokenizer.encode, **options)
        self._predict = compile_frozen(self.predictor.forward, **options)
        self._decode = compile_frozen(self.tokenizer.decode_embeddings, **options)
        return self

    def train(self, mode: bool = True):
        super().train(False)  # frozen: eval mode, except the predictor's dropout when asked for
        for m in getattr(self, "predictor_dropout", ()):
            m.train(True)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None,
                noise_generator: torch.Generator | None = None) -> TrainingSample:
        """images (B, 3, H, W) in [0, 1] -> TrainingSample."""
        z0 = self._encode(images)  # (B, L)
        B, L = z0.shape
        if L != self.schedule.seq_len:
            raise ValueError(f"images give {L} tokens, the token predictor expects {self.schedule.seq_len}")
        masks = self.schedule.draw(B, images.device, generator, noise_generator)
        logits_in, logits_target = self.predict(z0, masks)
        codebook = self.tokenizer.codebook
        if self.config.mapping == "weighted_sum":
            emb = ops.codebook_weighted_sum(logits_in, codebook, z0, masks.mask_t)
        else:
            if self.config.mapping == "argmax":
                guess = logits_in.argmax(-1)
            else:
                u = _rand(logits_in.shape, logits_in.device, noise_generator)
                guess = (logits_in.float() - torch.log(-torch.log(u.clamp_min(1e-20)))).argmax(-1)  # Gumbel-max
            emb = self.tokenizer.embed_ids(torch.where(masks.mask_t, guess, z0))
        x_t = self._decode(emb).clamp(0, 1).float()
        target = logits_target.float().softmax(-1) * masks.mask_t[..., None]
        return TrainingSample(x_t, z0, masks.mask_t, masks.mask_next, L - masks.num_masked, target)

    def predict(self, z0: torch.Tensor, masks: MaskPair) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictor logits for the input mapping and for the target, in one batched pass."""
        if self.config.condition == "same":
            logits = self._predict(z0, masks.mask_t)
            return logits, logits
        both = self._predict(torch.cat([z0, z0]), torch.cat([masks.mask_next, masks.mask_t]))
        return both.chunk(2)


def _dropout_layers(predictor: nn.Module, rate: float) -> list[nn.Module]:
    """The predictor's dropout modules (nn.Dropout and attention-probability dropout) set to
    `rate`; an empty list for rate 0."""
    if rate == 0:
        return []
    layers = []
    for m in predictor.modules():
        if isinstance(m, nn.Dropout):
            m.p = rate
            layers.append(m)
        elif hasattr(m, "attn_drop") and isinstance(m.attn_drop, float):
            m.attn_drop = rate
            layers.append(m)
    return layers
