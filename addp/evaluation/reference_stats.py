"""Reference statistics for FID in ADM's ``.npz`` convention, and their on-disk cache.

A statistics file holds ``mu`` (D,) and ``sigma`` (D, D) of the reference's features (what
ADM's evaluator and most papers publish), and where known ``features`` (N, D) for KID and
precision/recall, ``num_images``, and what they were computed with: ``feature_extractor``,
``image_size`` and ``preprocess``. Files from elsewhere may hold only ``mu`` and ``sigma``.

The cache keeps one such file per reference, named by the SHA-256 of everything the numbers
depend on: the reference's files (relative path, size and modification time of each), the
feature extractor's weights, the image size and the preprocessing.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runs.files import atomic_write
from ..errors import AddpError

META_KEYS = ("feature_extractor", "image_size", "preprocess")


# how far from a symmetric positive semi-definite matrix a stored sigma may be (relative)
SYMMETRY_RTOL, SYMMETRY_ATOL, NEGATIVE_EIGENVALUE = 1e-5, 1e-8, 1e-6

def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "addp" / "reference-stats"


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    num_images: int | None = None
    meta: dict = field(default_factory=dict)  # feature_extractor, image_size, preprocess

    @classmethod
    def from_features(cls, features: np.ndarray, **meta) -> "ReferenceStats":
        import torch

        from ..runtime.extras import require
        require("torch_fidelity", "reference statistics")
        from torch_fidelity.metric_fid import fid_features_to_statistics
        stats = fid_features_to_statistics(torch.from_numpy(features))
        return cls(np.asarray(stats["mu"], np.float64), np.asarray(stats["sigma"], np.float64), features,
                   len(features), meta)


def is_stats_file(path) -> bool:
    """An .npz holding ``mu`` (a statistics file, possibly with images too, as ADM's).

    An .npz with neither ``mu`` nor ``arr_0`` is neither statistics nor images: an error."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    except (OSError, zipfile.BadZipFile):
        return False
    if "mu" not in names and "arr_0" not in names:
        raise AddpError(f"{path} holds neither statistics ('mu' and 'sigma') nor images ('arr_0'); "
                        f"it holds: {', '.join(names) or 'nothing'}")
    return "mu" in names


def load_stats(path) -> ReferenceStats:
    """Read and check a statistics file; every problem is one AddpError line."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k in ("mu", "sigma", "features", "num_images", *META_KEYS)}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise AddpError(f"{path} is not a readable statistics .npz ({type(e).__name__})") from None
    if not {"mu", "sigma"} <= set(arrays):
        raise AddpError(f"{path} is not a statistics file: it needs 'mu' and 'sigma' "
                        f"(it holds: {', '.join(sorted(arrays)) or 'nothing of these'})")
    mu, sigma, features = arrays["mu"], arrays["sigma"], arrays.get("features")
    try:
        num = int(arrays["num_images"]) if "num_images" in arrays else None
    except (TypeError, ValueError):
        raise AddpError(f"{path}: 'num_images' must be one integer") from None
    meta = {k: arrays[k].tolist() for k in META_KEYS if k in arrays}
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise AddpError(f"{path}: 'mu' must be (D,) and 'sigma' (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise AddpError(f"{path}: 'mu' and 'sigma' must be floating point, got {mu.dtype} and {sigma.dtype}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise AddpError(f"{path}: 'mu' or 'sigma' holds NaN or Inf")
    # float rounding of a covariance estimate: slightly asymmetric, eigenvalues slightly below 0
    symmetric = np.allclose(sigma, sigma.T, rtol=SYMMETRY_RTOL, atol=SYMMETRY_ATOL)
    if not symmetric or np.linalg.eigvalsh(sigma).min() < -NEGATIVE_EIGENVALUE * max(1.0, np.abs(sigma).max()):
        raise AddpError(f"{path}: 'sigma' is not a covariance matrix (not symmetric positive semi-definite)")
    for key, value in meta.items():
        if not isinstance(value, list if key == "image_size" else str):
            want = "a list (H, W)" if key == "image_size" else "text"
            raise AddpError(f"{path}: '{key}' must be {want}, got {value!r}")
    if features is not None and (features.ndim != 2 or features.shape[1] != len(mu)):
        raise AddpError(f"{path}: 'features' must be (N, {len(mu)}), got {features.shape}")
    return ReferenceStats(mu.astype(np.float64), sigma.astype(np.float64), features, num, meta)


def save_stats(stats: ReferenceStats, path) -> Path:
    arrays = {"mu": stats.mu, "sigma": stats.sigma}
    if stats.features is not None:
        arrays["features"] = stats.features
    if stats.num_images is not None:
        arrays["num_images"] = np.array(stats.num_images)
    arrays.update({k: np.array(v) for k, v in stats.meta.items() if k in META_KEYS})

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write)


def cache_key(reference_identity, extractor_identity: str, image_size, preprocess: str | None) -> str:
    text = json.dumps({"reference": reference_identity, "feature_extractor": extractor_identity,
                       "image_size": image_size, "preprocess": preprocess, "format": 1}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def files_identity(root: Path, files) -> list:
    """What a folder's images are, without reading them: relative path, size, mtime of each."""
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.relative_to(root)), st.st_size, st.st_mtime_ns])
    return out
