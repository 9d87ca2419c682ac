"""The FID feature extractor's weights, read safely before torch-fidelity sees them.

torch-fidelity reads a weights file with ``torch.load(weights_only=False)``, which runs any
pickled object in it. The file is therefore read here, through the package's checked loader
(`weights_only=True`, tensors only, no NaN or Inf, a regular file), and torch-fidelity is handed
an in-memory copy holding only those tensors, never the file itself.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from ..errors import AddpError
from ..models.weights_io import read_tensors

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def inception_weights(path: str | os.PathLike | None) -> Path:
    """The local Inception weights file: the one given, or torch-fidelity's cached copy."""
    if path is not None:
        if not Path(path).exists():
            raise AddpError(f"Inception weights file not found: {path}")
        return Path(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.exists():
        return cached
    raise AddpError(f"no Inception weights here and nothing is downloaded: fetch {INCEPTION_URL} on a machine "
                    f"with internet and pass --inception-weights FILE (or copy it to {cached}), "
                    f"or use --feature-extractor <classifier.safetensors>")


def checked_weights(path: str | os.PathLike) -> io.BytesIO:
    """The tensors of the weights file `path`, checked, as an in-memory file for torch-fidelity's
    ``feature_extractor_weights_path`` (what it unpickles is then only what was written here)."""
    state, _ = read_tensors(path, "Inception weights")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer
