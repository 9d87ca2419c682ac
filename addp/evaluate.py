"""`python -m addp.evaluate`: FID / IS / KID / precision-recall of samples, through torch-fidelity.

Samples: a folder of images (its numbered files 000000.png ... when it has any, else every
png/jpg below it), a samples.npz (uint8 N x H x W x 3 under "arr_0"), or "digits" (the
held-out split of the bundled digits, the reference for the demo). All the same size.

Reference: the same kinds (a folder may hold class subfolders, as ImageNet-val does; its
images are resized and centre-cropped to the samples' size, --preprocess), or a statistics
.npz in ADM's convention ("mu", "sigma"; "features" for KID / precision-recall). Statistics
of a folder or npz are cached on disk (--stats-cache), keyed by its files' names, sizes and
times, the feature extractor, the image size and the preprocessing; --save-reference-stats
writes them as a statistics file.

Images are streamed in batches through the feature extractor: memory holds the features,
never all the images.

Features come from one of
  --feature-extractor classifier.safetensors   one of our classifiers (offline; how digits are
                                                judged): pooled features for FID/KID/PRC,
                                                logits for IS; also reports its mean max-probability
  --inception-weights FILE                      torch-fidelity's Inception-v3 (the standard FID);
                                                without the flag, only an already cached copy is used.
Nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .cli import ArgumentParser, device, existing_file, output_file, positive_int, run_command
from .errors import AddpError
from .runs.files import atomic_write
from .runs.images import read_rgb
from .runs.npz_stream import NpzImageReader
from .evaluation.reference_stats import (ReferenceStats, cache_key, default_cache_dir, files_identity, is_stats_file,
                              load_stats, save_stats)

METRICS = ("fid", "isc", "kid", "prc")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
PREPROCESS = ("addp", "adm")
PRC_ROWS = 1000
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


# --------------------------------------------------------------------------- inputs
class ImagesDataset(torch.utils.data.Dataset):
    """uint8 images (N, 3, H, W) held in memory (small sets: the digits, tensors from Python)."""

    def __init__(self, images: torch.Tensor, identity=None):
        self.images = images
        self.size = tuple(images.shape[-2:])
        self.identity = identity if identity is not None else ["tensor", _tensor_hash(images)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class FolderImages(torch.utils.data.Dataset):
    """Image files decoded one at a time -> uint8 (3, H, W).

    With ``preprocess`` every image is resized and centre-cropped to ``size`` (square);
    without, every image must already be ``size`` (that of the first when None).
    """

    def __init__(self, root: Path, files: list, size=None, preprocess: str | None = None):
        self.root, self.files, self.preprocess = root, files, preprocess
        self.size = (size, size) if isinstance(size, int) else size
        if self.size is None:
            self.size = self._decode(files[0]).shape[:2]
        self.identity = ["folder", files_identity(root, files)]

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, f: Path) -> np.ndarray:
        im = read_rgb(f)  # one-line error on a bad file or a decompression bomb
        if self.preprocess is not None:
            im = resize_center_crop(im, self.size[0], self.preprocess)
        return np.array(im)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self._decode(self.files[i])
        if tuple(image.shape[:2]) != tuple(self.size):
            raise AddpError(f"{self.files[i]} is {image.shape[1]}x{image.shape[0]}, "
                            f"the other images {self.size[1]}x{self.size[0]}")
        return torch.from_numpy(image).permute(2, 0, 1)


class NpzImages(torch.utils.data.Dataset):
    """The images of a samples .npz (arr_0, uint8 N x H x W x 3), read one at a time."""

    def __init__(self, path: Path):
        try:
            self.reader = NpzImageReader(path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise AddpError(f"{path} is not a readable samples .npz ({str(e) or type(e).__name__})") from None
        self.size = tuple(self.reader.shape[1:3])
        st = path.stat()
        self.identity = ["npz", st.st_size, st.st_mtime_ns]

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.reader[i].copy()).permute(2, 0, 1)


def resize_center_crop(im: Image.Image, size: int, preprocess: str) -> Image.Image:
    """The reference preparation of the official releases: the short side resized to ``size``
    then a centre crop. "addp": torchvision's Resize + CenterCrop (ADDP's
    prepare_imagenet_val.py); "adm": halvings with BOX while the short side is at least twice
    ``size``, then BICUBIC (ADM's center_crop_arr)."""
    if preprocess == "addp":
        from torchvision.transforms import functional as TF
        return TF.center_crop(TF.resize(im, size), size)
    while min(im.size) >= 2 * size:
        im = im.resize(tuple(x // 2 for x in im.size), resample=Image.BOX)
    scale = size / min(im.size)
    im = im.resize(tuple(round(x * scale) for x in im.size), resample=Image.BICUBIC)
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    return im.crop((left, top, left + size, top + size))


def list_images(folder: Path) -> list:
    """The numbered images of ``folder`` (000000.png ...) when it has any, else every image below it."""
    numbered = sorted(f for f in folder.iterdir()
                      if f.suffix.lower() in IMAGE_EXTS and re.fullmatch(r"\d+", f.stem) and f.is_file())
    if numbered:
        return numbered
    return sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file())


def open_images(source, size=None, preprocess: str | None = None) -> torch.utils.data.Dataset:
    """A folder, a samples .npz, "digits" or a uint8 (N, 3, H, W) tensor -> a dataset of uint8
    (3, H, W) images with ``.size`` (H, W) and ``.identity`` (what its cache key depends on)."""
    if isinstance(source, torch.Tensor):
        return ImagesDataset(source)
    if source == "digits":
        from .training.data import load_digits
        return ImagesDataset((load_digits("heldout")[0] * 255).round().to(torch.uint8))
    path = Path(source)
    if not path.exists():
        raise AddpError(f"{source} does not exist (expected a folder of images, an .npz or 'digits')")
    if path.is_file():
        if path.suffix != ".npz":
            raise AddpError(f"{source} is not a folder, an .npz or 'digits'")
        return NpzImages(path)
    files = list_images(path)
    if not files:
        raise AddpError(f"{source} holds no png/jpg images")
    return FolderImages(path, files, size, preprocess)


def load_images(source) -> torch.Tensor:
    """All images of ``source`` in memory as uint8 (N, 3, H, W): for small sets only."""
    ds = open_images(source)
    return torch.stack([ds[i] for i in range(len(ds))])


def _tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _module_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _file_hash(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


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
    from .models import classifier  # noqa: F401  (registers the classifier model kind)
    from .models.checkpoint import load_checkpoint
    return load_checkpoint(path, "classifier").eval()


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


# --------------------------------------------------------------------------- features
class Features:
    """A torch-fidelity feature extractor, the layer each metric reads, and what identifies it."""

    def __init__(self, metrics, classifier: nn.Module | None = None, inception_weights_path: str | None = None,
                 cuda: bool = False):
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
        from torch_fidelity.utils import create_feature_extractor
        if classifier is not None:
            name, kwargs = register_classifier(classifier), {}
            self.identity = f"classifier:{_module_hash(classifier)}"
        else:
            name = "inception-v3-compat"
            weights = inception_weights(inception_weights_path)
            kwargs = {"feature_extractor_weights_path": weights}
            self.identity = f"{name}:{_file_hash(weights)}"
        cls = FEATURE_EXTRACTORS_REGISTRY[name]
        self.layers = {m: cls.get_default_feature_layer_for_metric(m) for m in METRICS}
        # the reference side needs one layer: FID's, which KID and precision/recall share
        assert self.layers["fid"] == self.layers["kid"] == self.layers["prc"]
        self.reference_layer = self.layers["fid"]
        wanted = sorted({self.layers[m] for m in metrics} | {self.reference_layer})
        self.cuda = cuda
        self.extractor = create_feature_extractor(name, wanted, cuda=cuda, verbose=False, **kwargs)

    def dim(self, dataset) -> int:
        """The width of the reference layer, from the first image of ``dataset``."""
        first = self(torch.utils.data.Subset(dataset, [0]), 1)
        return first[self.reference_layer].shape[1]

    def __call__(self, dataset, batch_size: int) -> dict:
        """Features of every image of ``dataset``, computed ``batch_size`` images at a time.

        Each layer's features go into one array allocated at the first batch: per-batch pieces
        kept until the end (torch-fidelity's ``get_featuresdict_from_dataset``) pin the heap
        between the batches' transient buffers, and peak memory then grows with the number of
        images far beyond the features themselves.
        """
        loader = torch.utils.data.DataLoader(dataset, batch_size=min(batch_size, len(dataset)), pin_memory=self.cuda)
        out, start = None, 0
        with torch.no_grad():
            for batch in loader:
                if self.cuda:
                    batch = batch.cuda(non_blocking=True)
                try:
                    feats = self.extractor.convert_features_tuple_to_dict(self.extractor(batch))
                except ValueError as e:  # torch-fidelity's own checks (vassert)
                    raise AddpError(f"torch-fidelity: {str(e).splitlines()[0]}") from None
                if out is None:
                    out = {k: torch.empty((len(dataset), *v.shape[1:]), dtype=v.dtype) for k, v in feats.items()}
                for k, v in feats.items():
                    out[k][start:start + len(v)] = v
                start += len(batch)
        return out


# --------------------------------------------------------------------------- reference statistics
def reference_stats(reference, features: Features, size, preprocess: str, batch_size: int,
                    cache_dir=None) -> tuple[ReferenceStats, str, Path | None]:
    """The reference's statistics and how they were had: "file" (a statistics .npz),
    "cached" (the cache held them) or "computed" (and cached when ``cache_dir`` is given)."""
    if isinstance(reference, (str, Path)) and str(reference).endswith(".npz") and is_stats_file(reference):
        stats = load_stats(reference)
        _check_stats_fit(stats, features, size, reference)
        return stats, "file", Path(reference)
    ds = open_images(reference, size=size, preprocess=preprocess)
    if tuple(ds.size) != tuple(size):
        raise AddpError(f"the reference holds {ds.size[1]}x{ds.size[0]} images, the samples are {size[1]}x{size[0]}")
    preprocess = preprocess if isinstance(ds, FolderImages) else None
    meta = {"feature_extractor": features.identity, "image_size": list(size), "preprocess": preprocess or "none"}
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{cache_key(ds.identity, features.identity, list(size), preprocess)}.npz"
        if path.exists():
            try:
                return load_stats(path), "cached", path
            except AddpError:
                pass  # an unreadable cache entry is recomputed and replaced
    feats = features(ds, batch_size)[features.reference_layer].numpy()
    stats = ReferenceStats.from_features(feats, **meta)
    if path is not None:
        save_stats(stats, path)
    return stats, "computed", path


def _check_stats_fit(stats: ReferenceStats, features: Features, size, path) -> None:
    made_with = stats.meta.get("feature_extractor")
    if made_with is not None and made_with != features.identity:
        raise AddpError(f"{path} was computed with another feature extractor ({made_with.split(':')[0]})")
    image_size = stats.meta.get("image_size")
    if image_size is not None and size is not None and list(image_size) != list(size):
        raise AddpError(f"{path} holds statistics of {image_size[1]}x{image_size[0]} images, "
                        f"the samples are {size[1]}x{size[0]}")


# --------------------------------------------------------------------------- metrics
def _metrics_from_features(f1: dict, ref: ReferenceStats, features: Features, metrics, cuda: bool) -> dict:
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    # precision/recall holds PRC_ROWS x N distances at a time (torch-fidelity's default: 10,000 rows)
    kw = dict(verbose=False, cuda=cuda, save_cpu_ram=True, prc_batch_size=PRC_ROWS)
    samples = f1[features.reference_layer]
    result = {}
    if "isc" in metrics:
        result.update(isc_featuresdict_to_metric(f1, features.layers["isc"], isc_splits=min(10, len(samples)), **kw))
    if "fid" in metrics:
        s1 = fid_features_to_statistics(samples)
        s1 = {k: np.asarray(v, np.float64) for k, v in s1.items()}
        result.update(fid_statistics_to_metric(s1, {"mu": ref.mu, "sigma": ref.sigma}, False))
    if {"kid", "prc"} & set(metrics):
        real = torch.from_numpy(ref.features).to(samples.dtype)
        if "kid" in metrics:
            result.update(kid_features_to_metric(samples, real, kid_subset_size=min(1000, len(samples), len(real)), **kw))
        if "prc" in metrics:
            result.update(prc_features_to_metric(samples, real, **kw))
    return {k: float(v) for k, v in result.items()}


def small_sample_warnings(num_samples: int, num_reference: int | None, dim: int) -> list[str]:
    """FID's covariance has ``dim`` x ``dim`` entries: from fewer images it is singular and the
    number is not comparable with published ones."""
    return [f"FID from {n} {side} images, fewer than the {dim} feature dimensions: the covariance is singular "
            f"and the value is not comparable with published FIDs (use at least {dim}; papers use 50,000)"
            for side, n in (("sample", num_samples), ("reference", num_reference)) if n is not None and n < dim]


def evaluate(samples, reference, metrics=("fid",), classifier: nn.Module | None = None,
             inception_weights_path: str | None = None, batch_size: int = 64, device=None,
             preprocess: str = "addp", cache_dir=None, image_size: int | None = None,
             save_reference_stats=None, log=lambda text: print(text, file=sys.stderr)) -> dict:
    """Metrics of ``samples`` against ``reference``, streaming both through the feature extractor.

    samples / reference: sources for ``open_images``; the reference may also be a statistics
    .npz. ``image_size``: what a reference folder is resized and cropped to (default: the
    samples' size). ``cache_dir``: where reference statistics are cached (None: not cached).
    ``samples`` may be None when only ``save_reference_stats`` is wanted. With ``classifier``
    its features are used (and its mean max-probability on the samples is added); otherwise
    Inception-v3 from a local file.
    """
    bad = sorted(set(metrics) - set(METRICS))
    if bad or not metrics:
        raise AddpError(f"unknown metrics {', '.join(bad) or '(none)'}; choose from {', '.join(METRICS)}")
    if preprocess not in PREPROCESS:
        raise AddpError(f"unknown preprocessing {preprocess!r}; choose from {', '.join(PREPROCESS)}")
    if samples is None and save_reference_stats is None:
        raise AddpError("nothing to do: give samples, or a file to save the reference statistics to")
    if image_size is not None and image_size < 1:
        raise AddpError(f"--image-size must be >= 1, got {image_size}")
    ds = open_images(samples) if samples is not None else None
    size = (image_size, image_size) if image_size is not None else (ds.size if ds is not None else None)
    if size is None:
        raise AddpError("give --image-size: the size the reference images are prepared at")
    if ds is not None and tuple(ds.size) != tuple(size):
        raise AddpError(f"the samples are {ds.size[1]}x{ds.size[0]}, --image-size asks for {size[1]}x{size[0]}")
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    features = Features(metrics, classifier, inception_weights_path, cuda)

    needs_reference = ds is None or bool({"fid", "kid", "prc"} & set(metrics))
    dim = features.dim(ds) if ds is not None else None
    result, ref = {}, None
    if needs_reference:
        ref, how, path = reference_stats(reference, features, size, preprocess, batch_size, cache_dir)
        if dim is not None and len(ref.mu) != dim:
            raise AddpError(f"the reference statistics have {len(ref.mu)} features, the feature extractor gives {dim}")
        if {"kid", "prc"} & set(metrics) and ref.features is None:
            raise AddpError("the reference statistics hold no 'features': KID and precision/recall need them "
                            "(ask for fid/isc only, or give the reference images)")
        _log_reference(log, how, path, ref)
        result.update(num_reference=ref.num_images, reference_statistics=how,
                      reference_statistics_file=str(path) if path else None)
        if save_reference_stats is not None:
            save_stats(ref, save_reference_stats)
            result["saved_reference_statistics"] = str(save_reference_stats)
    if ds is None:
        return result
    if "fid" in metrics:
        result["warnings"] = small_sample_warnings(len(ds), ref.num_images, dim)
        for w in result["warnings"]:
            log(f"warning: {w}")
    f1 = features(ds, batch_size)
    result.update(_metrics_from_features(f1, ref, features, metrics, cuda))
    result["num_samples"] = len(ds)
    if classifier is not None:
        result.update(mean_max_probability(classifier.cuda() if cuda else classifier, ds, batch_size))
    return result


def _log_reference(log, how: str, path, ref: ReferenceStats) -> None:
    n = f"{ref.num_images} images" if ref.num_images is not None else "an unknown number of images"
    if how == "cached":
        log(f"reference statistics: reused the cached statistics of {n} from {path}")
    elif how == "file":
        log(f"reference statistics: read from {path} ({n})")
    else:
        log(f"reference statistics: computed from {n}" + (f", cached in {path}" if path else ""))


@torch.no_grad()
def mean_max_probability(model: nn.Module, images, batch_size: int = 256) -> dict:
    """Classifier confidence on uint8 images (a tensor or a dataset of (3, H, W)): mean max
    softmax probability and the class histogram, accumulated batch by batch."""
    device = next(model.parameters()).device
    size = model.config.image_size
    total, counts = 0.0, None
    for chunk in torch.utils.data.DataLoader(images, batch_size=batch_size):
        x = chunk.to(device).float() / 255
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        p = model(x).float().softmax(-1).cpu()
        total += p.max(-1).values.double().sum().item()
        batch_counts = torch.bincount(p.argmax(-1), minlength=p.shape[1])
        counts = batch_counts if counts is None else counts + batch_counts
    return {"mean_max_prob": total / len(images), "class_counts": counts.tolist()}


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser("evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", default=None, help="folder of images or samples.npz (optional with --save-reference-stats)")
    p.add_argument("--reference", required=True, help="folder of images (class subfolders allowed), an images .npz, "
                                                       "a statistics .npz (mu, sigma), or 'digits'")
    p.add_argument("--metrics", default="fid", help=f"comma-separated subset of {','.join(METRICS)}")
    p.add_argument("--feature-extractor", type=existing_file, default=None,
                   help="one of our classifier checkpoints (.safetensors)")
    p.add_argument("--inception-weights", type=existing_file, default=None, help=f"local {INCEPTION_FILE}")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="size the reference images are resized and centre-cropped to (default: the samples' size)")
    p.add_argument("--preprocess", default="addp", choices=PREPROCESS,
                   help="reference preparation: ADDP's (torchvision Resize + CenterCrop) or ADM's center_crop_arr")
    p.add_argument("--stats-cache", default=str(default_cache_dir()), help="folder caching reference statistics")
    p.add_argument("--no-stats-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--save-reference-stats", type=output_file, default=None, metavar="PATH",
                   help="write the reference statistics here (ADM's .npz convention: mu, sigma, features)")
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
                      args.batch_size, args.device, args.preprocess, None if args.no_stats_cache else args.stats_cache,
                      args.image_size, args.save_reference_stats)
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
