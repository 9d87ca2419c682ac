"""FID / IS / KID / precision-recall of samples against a reference (images or statistics),
through torch-fidelity, with images streamed and reference statistics cached."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import AddpError
from .features import METRICS, Features
from .images import PREPROCESS, FolderImages, open_images
from .reference_stats import (ReferenceStats, cache_key, is_stats_file, load_stats, save_stats)


PRC_ROWS = 1000
KID_SUBSET_SIZE = 1000  # torch-fidelity's default size of KID's subsets


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
    _check_counts(metrics, len(samples), None if ref.features is None else len(ref.features))
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
            result.update(kid_features_to_metric(samples, real, kid_subset_size=min(KID_SUBSET_SIZE, len(samples), len(real)), **kw))
        if "prc" in metrics:
            result.update(prc_features_to_metric(samples, real, **kw))
    return {k: float(v) for k, v in result.items()}


# the fewest images each side needs: a covariance and KID's unbiased estimate divide by n - 1,
# precision/recall finds each image's 3 nearest neighbours among the others
MIN_IMAGES = {"fid": 2, "isc": 2, "kid": 2, "prc": 4}


def _check_counts(metrics, num_samples: int, num_reference: int | None) -> None:
    """Refuse a metric that is undefined (NaN) or meaningless for so few images, in one line."""
    for m in metrics:
        for side, n in (("sample", num_samples), ("reference", num_reference if m in ("kid", "prc") else None)):
            if n is not None and n < MIN_IMAGES[m]:
                raise AddpError(f"{m} needs at least {MIN_IMAGES[m]} {side} images, got {n}")


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
    if ds is not None:
        _check_counts(metrics, len(ds), None)  # before the reference's features are computed
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
