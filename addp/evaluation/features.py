"""Feature extractors for the metrics: torch-fidelity's Inception-v3 from a local weights file, or
one of our classifiers, each with what identifies it (for the statistics cache)."""
from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import AddpError, first_line
from .extractor_weights import INCEPTION_FILE, INCEPTION_URL, checked_weights, inception_weights  # noqa: F401
from ..runs.files import sha256_file
from ..runtime.extras import require


METRICS = ("fid", "isc", "kid", "prc")


def _module_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- classifier features
def classifier_extractor_class(model: nn.Module):
    """A torch-fidelity feature extractor class around one of our classifiers.

    Features "features" (the head's input, for FID/KID/PRC) and "logits" (for IS), computed
    on uint8 images resized to the classifier's input size.
    """
    require("torch_fidelity", "a classifier's features for the metrics")
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
    from ..models.checkpoint import load_checkpoint
    return load_checkpoint(path, "classifier").eval()


# --------------------------------------------------------------------------- features
class Features:
    """A torch-fidelity feature extractor, the layer each metric reads, and what identifies it."""

    def __init__(self, metrics, classifier: nn.Module | None = None, inception_weights_path: str | None = None,
                 cuda: bool = False):
        require("torch_fidelity", "computing FID, KID, IS or precision/recall")
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
        from torch_fidelity.utils import create_feature_extractor
        if classifier is not None:
            name, kwargs = register_classifier(classifier), {}
            self.identity = f"classifier:{_module_hash(classifier)}"
        else:
            name = "inception-v3-compat"
            weights = inception_weights(inception_weights_path)
            # torch-fidelity unpickles what it is given: it gets only our checked copy of the tensors
            kwargs = {"feature_extractor_weights_path": checked_weights(weights)}
            self.identity = f"{name}:{sha256_file(weights)}"
        cls = FEATURE_EXTRACTORS_REGISTRY[name]
        self.layers = {m: cls.get_default_feature_layer_for_metric(m) for m in METRICS}
        # the reference side needs one layer: FID's, which KID and precision/recall share
        assert self.layers["fid"] == self.layers["kid"] == self.layers["prc"]
        self.reference_layer = self.layers["fid"]
        wanted = sorted({self.layers[m] for m in metrics} | {self.reference_layer})
        self.cuda = cuda
        try:
            self.extractor = create_feature_extractor(name, wanted, cuda=cuda, verbose=False, **kwargs)
        except RuntimeError as e:  # load_state_dict: the file holds other weights
            raise AddpError(f"the feature extractor's weights do not fit it ({first_line(e)})") from None

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
        bad = [k for k, v in out.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:  # else the metrics fail deep inside scipy, or give NaN
            raise AddpError(f"the feature extractor gives non-finite features ({bad[0]}: NaN or Inf): its "
                            "weights overflow on these images")
        return out
