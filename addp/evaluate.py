"""`python -m addp.evaluate`: FID / IS / KID / precision-recall of samples, through torch-fidelity.

Inputs: a folder of images (its numbered files 000000.png ... when it has any, else every
png/jpg), a samples.npz (uint8 N x H x W x 3 under "arr_0"), or "digits" (the held-out split
of the bundled digits, the reference for the demo).

Features come from one of
  --feature-extractor classifier.safetensors   one of our classifiers (offline; how digits are
                                                judged): pooled features for FID/KID/PRC,
                                                logits for IS; also reports its mean max-probability
  --inception-weights FILE                      torch-fidelity's Inception-v3 (the standard FID);
                                                without the flag, only an already cached copy is used.
Nothing is ever downloaded.
"""
from __future__ import annotations

import itertools
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .cli import ArgumentParser, device, existing_file, output_file, positive_int, run_command
from .errors import AddpError
from .files import atomic_write
from .images import read_rgb

METRICS = ("fid", "isc", "kid", "prc")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


# --------------------------------------------------------------------------- inputs
class ImagesDataset(torch.utils.data.Dataset):
    """uint8 images (N, 3, H, W) held in memory, as torch-fidelity wants them."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def load_images(source: str) -> torch.Tensor:
    """A folder, an .npz or "digits" -> uint8 (N, 3, H, W)."""
    if source == "digits":
        from .data import load_digits
        return (load_digits("heldout")[0] * 255).round().to(torch.uint8)
    path = Path(source)
    if not path.exists():
        raise AddpError(f"{source} does not exist (expected a folder of images, an .npz or 'digits')")
    if path.is_file():
        if path.suffix != ".npz":
            raise AddpError(f"{source} is not a folder, an .npz or 'digits'")
        try:
            arr = np.load(path)["arr_0"]
        except Exception as e:
            raise AddpError(f"{source} is not a readable samples .npz with 'arr_0' ({type(e).__name__})") from None
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise AddpError(f"{source}: arr_0 must be uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}")
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_EXTS)
    numbered = [f for f in files if re.fullmatch(r"\d+", f.stem)]
    files = numbered or files
    if not files:
        raise AddpError(f"{source} holds no png/jpg images")
    images = []
    for f in files:
        images.append(np.asarray(read_rgb(f)))  # one-line UnreadableImage on a bad file or a bomb
    if len({im.shape for im in images}) > 1:
        raise AddpError(f"{source}: images of different sizes")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- classifier features
def classifier_extractor_class(model: nn.Module):
    """A torch-fidelity feature extractor class around one of our classifiers.

    Features "features" (the head's input, for FID/KID/PRC) and "logits" (for IS), computed
    on uint8 images resized to the classifier's input size.
    """
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class ClassifierFeatures(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.model = model.eval()
            self.size = model.config.image_size

        @staticmethod
        def get_provided_features_list():
            return ("features", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "logits" if metric == "isc" else "features"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, model.config.image_size, model.config.image_size, dtype=torch.uint8)

        def forward(self, x):
            x = x.float() / 255  # (B, 3, H, W) uint8 -> [0, 1]
            if tuple(x.shape[-2:]) != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
            out = {"features": self.model.forward_features(x).double(), "logits": self.model(x).double()}
            return tuple(out[k] for k in self.features_list)

    return ClassifierFeatures


_counter = itertools.count()


def register_classifier(model: nn.Module) -> str:
    """Register a classifier with torch-fidelity under a fresh name; returns the name."""
    from torch_fidelity import register_feature_extractor
    name = f"addp-classifier-{next(_counter)}"
    register_feature_extractor(name, classifier_extractor_class(model))
    return name


def load_classifier(path) -> nn.Module:
    from . import classifier  # noqa: F401  (registers the classifier model kind)
    from .checkpoint import load_checkpoint
    return load_checkpoint(path, "classifier").eval()


@torch.no_grad()
def mean_max_probability(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> dict:
    """Classifier confidence on uint8 images: mean max softmax probability and the class histogram."""
    device = next(model.parameters()).device
    probs = []
    size = model.config.image_size
    for chunk in images.split(batch_size):
        x = chunk.to(device).float() / 255
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        probs.append(model(x).float().softmax(-1).cpu())
    p = torch.cat(probs)
    counts = torch.bincount(p.argmax(-1), minlength=p.shape[1])
    return {"mean_max_prob": p.max(-1).values.mean().item(), "class_counts": counts.tolist()}


# --------------------------------------------------------------------------- inception
def inception_weights(path: str | None) -> str:
    """The local Inception weights file: the one given, or torch-fidelity's cached copy."""
    if path is not None:
        if not Path(path).is_file():
            raise AddpError(f"Inception weights file not found: {path}")
        return str(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return str(cached)
    raise AddpError(f"no Inception weights here and nothing is downloaded: fetch {INCEPTION_URL} on a machine "
                    f"with internet and pass --inception-weights FILE (or copy it to {cached}), "
                    f"or use --feature-extractor <classifier.safetensors>")


# --------------------------------------------------------------------------- metrics
def evaluate(samples, reference, metrics=("fid",), classifier: nn.Module | None = None,
             inception_weights_path: str | None = None, batch_size: int = 64, device=None) -> dict:
    """Metrics of ``samples`` against ``reference`` (each a source for ``load_images`` or a
    uint8 (N, 3, H, W) tensor). With ``classifier`` its features are used (and its mean
    max-probability on the samples is added); otherwise Inception-v3 from a local file."""
    import torch_fidelity

    bad = sorted(set(metrics) - set(METRICS))
    if bad or not metrics:
        raise AddpError(f"unknown metrics {', '.join(bad) or '(none)'}; choose from {', '.join(METRICS)}")
    a = samples if isinstance(samples, torch.Tensor) else load_images(samples)
    b = reference if isinstance(reference, torch.Tensor) else load_images(reference)
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    kwargs = dict(input1=ImagesDataset(a), input2=ImagesDataset(b), cuda=cuda, batch_size=batch_size,
                  cache=False, verbose=False, save_cpu_ram=True, **{m: m in metrics for m in METRICS})
    if "kid" in metrics:
        kwargs["kid_subset_size"] = min(1000, len(a), len(b))
    if "isc" in metrics:
        kwargs["isc_splits"] = min(10, len(a))
    if classifier is not None:
        kwargs["feature_extractor"] = register_classifier(classifier)
    else:
        kwargs["feature_extractor"] = "inception-v3-compat"
        kwargs["feature_extractor_weights_path"] = inception_weights(inception_weights_path)
    try:
        result = dict(torch_fidelity.calculate_metrics(**kwargs))
    except ValueError as e:  # torch-fidelity's own checks (vassert)
        raise AddpError(f"torch-fidelity: {str(e).splitlines()[0]}") from None
    result = {k: float(v) for k, v in result.items()}
    result.update(num_samples=len(a), num_reference=len(b))
    if classifier is not None:
        if cuda:
            classifier = classifier.cuda()
        result.update(mean_max_probability(classifier, a))
    return result


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser("evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", required=True, help="folder of images or samples.npz")
    p.add_argument("--reference", required=True, help="folder of images, an .npz, or 'digits'")
    p.add_argument("--metrics", default="fid", help=f"comma-separated subset of {','.join(METRICS)}")
    p.add_argument("--feature-extractor", type=existing_file, default=None,
                   help="one of our classifier checkpoints (.safetensors)")
    p.add_argument("--inception-weights", type=existing_file, default=None, help=f"local {INCEPTION_FILE}")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--device", type=device, default=None)
    p.add_argument("--output", type=output_file, default=None, help="also write the result as JSON here")
    p.add_check(_check_options)
    return p


def _check_options(args) -> None:
    if args.feature_extractor and args.inception_weights:
        raise AddpError("give --feature-extractor or --inception-weights, not both")
    args.metric_names = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    bad = sorted(set(args.metric_names) - set(METRICS))
    if bad or not args.metric_names:
        raise AddpError(f"--metrics: unknown metrics {', '.join(bad) or '(none)'}; choose from {', '.join(METRICS)}")


def main(args) -> dict:
    classifier = load_classifier(args.feature_extractor) if args.feature_extractor else None
    result = evaluate(args.samples, args.reference, args.metric_names, classifier, args.inception_weights,
                      args.batch_size, args.device)
    result.update(samples=args.samples, reference=args.reference,
                  features=args.feature_extractor or "inception-v3")
    if args.output:
        text = json.dumps(result)
        atomic_write(args.output, lambda tmp: Path(tmp).write_text(text + "\n"))
    return result


def cli(argv=None) -> int:
    return run_command("evaluate", get_args_parser(), main, argv)


if __name__ == "__main__":
    sys.exit(cli())
