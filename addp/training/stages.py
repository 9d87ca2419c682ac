"""The three training objectives of a full ADDP run, and the numbers that judge each.

  tokenizer  VQ autoencoder: L1 + MSE reconstruction + codebook/commitment loss
  predictor  MAGE: mask a truncated-normal fraction of tokens (drop half from the encoder),
             predict the masked ids (cross entropy, label smoothing 0.1)
  addp       the alternating denoising diffusion objective (diffusion.py + loss.py)
Each stage is a `trainer.Stage`: `model`, `loss_module` (forward(**inputs) -> loss) and
`prepare(images, generator, labels) -> inputs` (labels unused here).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .diffusion import DiffusionConfig, DiffusionProcess, _rand
from .loss import addp_loss, hard_target_cross_entropy
from .config import Stage


def device_noise(device: torch.device, generator: torch.Generator, cache: dict) -> torch.Generator:
    """A generator on `device`, reseeded each step from the (host) `generator`: noise is drawn
    where it is used (no host-to-device copy, no sync) yet follows the resumable host stream."""
    seed = int(torch.randint(2 ** 62, (), generator=generator))
    dev = torch.device(device)
    if dev not in cache:
        cache[dev] = torch.Generator(device=dev)
    return cache[dev].manual_seed(seed)


class Objective(nn.Module):
    """A model and its loss as one module: ``forward(**inputs)`` is ``fn(model, **inputs)``, what
    the Trainer calls (and compiles) each step."""

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, **inputs) -> torch.Tensor:
        return self.fn(self.model, **inputs)


# -- tokenizer -----------------------------------------------------------------------------
def _tokenizer_loss(tok, images):
    recon, _, vq_loss = tok(images)
    return (recon - images).abs().mean() + F.mse_loss(recon, images) + vq_loss


class TokenizerStage(Stage):
    name = "tokenizer"

    def __init__(self, tokenizer: nn.Module):
        self.model = tokenizer
        self.loss_module = Objective(tokenizer, _tokenizer_loss)

    def prepare(self, images, generator, labels=None):
        return {"images": images}


@torch.no_grad()
def reconstruction_psnr(tok: nn.Module, images: torch.Tensor, batch_size: int = 256) -> float:
    """Mean PSNR (dB) of encode -> quantize -> decode over images in [0, 1]."""
    tok.eval()
    scores = []
    for x in images.split(batch_size):
        x = x.to(tok.codebook.device)
        recon = tok.decode_ids(tok.encode(x)).clamp(0, 1)
        mse = (recon - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)  # a perfect reconstruction scores 100 dB
        scores.append(10 * torch.log10(1 / mse))
    return float(torch.cat(scores).mean())


# -- token predictor -----------------------------------------------------------------------
def truncated_normal(mu, std, low, high, generator) -> float:
    """One draw from N(mu, std) truncated to [low, high], by inverting the CDF."""
    normal = torch.distributions.Normal(0.0, 1.0)
    a, b = normal.cdf(torch.tensor((low - mu) / std)), normal.cdf(torch.tensor((high - mu) / std))
    u = a + (b - a) * torch.rand((), generator=generator)
    return float(mu + std * normal.icdf(u).clamp(-10, 10))


def _predictor_loss(pred, ids, mask, drop, num_kept):
    # over the whole vocabulary, as MAGE: the smoothing's share goes to class and mask logits too
    return hard_target_cross_entropy(pred(ids, mask, drop, num_kept, all_logits=True), ids, mask, smoothing=0.1)


class PredictorStage(Stage):
    name = "predictor"

    def __init__(self, predictor: nn.Module, tokenizer: nn.Module, diffusion: DiffusionConfig = DiffusionConfig()):
        self.model, self.tokenizer, self.cfg = predictor, tokenizer.eval().requires_grad_(False), diffusion
        self.loss_module = Objective(predictor, _predictor_loss)
        self._generators: dict = {}

    @torch.no_grad()
    def prepare(self, images, generator, labels=None):
        c = self.cfg
        ids = self.tokenizer.encode(images)
        B, L = ids.shape
        ratio = truncated_normal(c.ratio_mu, c.ratio_std, c.ratio_min, c.ratio_max, generator)
        n_mask, n_drop = math.ceil(L * ratio), math.ceil(L * c.ratio_min)
        noise = _rand((B, L), ids.device, device_noise(ids.device, generator, self._generators))
        rank = noise.argsort(1).argsort(1)
        return {"ids": ids, "mask": rank < n_mask, "drop": rank < n_drop, "num_kept": L - n_drop}


@torch.no_grad()
def masked_token_accuracy(pred: nn.Module, tok: nn.Module, images: torch.Tensor, ratio: float = 0.5,
                          seed: int = 0, batch_size: int = 256) -> tuple[float, float]:
    """Accuracy of the argmax prediction at `ratio` random masking, and the chance level
    (always guessing the most frequent token of these images)."""
    pred.eval()
    g = torch.Generator().manual_seed(seed)
    hits = total = 0
    all_ids = []
    for x in images.split(batch_size):
        ids = tok.encode(x.to(tok.codebook.device))
        B, L = ids.shape
        mask = torch.rand(B, L, generator=g).argsort(1).argsort(1).to(ids.device) < math.ceil(L * ratio)
        guess = pred(ids, mask).argmax(-1)
        hits += int((guess == ids)[mask].sum())
        total += int(mask.sum())
        all_ids.append(ids.flatten())
    counts = torch.bincount(torch.cat(all_ids))
    return hits / total, float(counts.max()) / float(counts.sum())


# -- ADDP ----------------------------------------------------------------------------------
def _addp_loss(net, x_t, ids, mask, num_reliable, target, kind):
    return addp_loss(net(x_t, ids, mask, num_reliable), ids, mask, target, kind)


class ADDPStage(Stage):
    name = "addp"

    def __init__(self, net: nn.Module, tokenizer: nn.Module, predictor: nn.Module,
                 diffusion: DiffusionConfig = DiffusionConfig(), target: str = "soft"):
        self.model = net
        self.process = DiffusionProcess(tokenizer, predictor, diffusion)
        self.loss_module = Objective(net, lambda m, **kw: _addp_loss(m, kind=target, **kw))
        self._generators: dict = {}

    def compile(self) -> None:
        """Under --compile the frozen passes (tokenizer, predictor) compile too."""
        self.process.compile()

    def prepare(self, images, generator, labels=None):
        self.process.to(images.device)
        s = self.process(images, generator, device_noise(images.device, generator, self._generators))
        return {"x_t": s.x_t, "ids": s.ids, "mask": s.mask, "num_reliable": s.num_reliable,
                "target": s.target}
