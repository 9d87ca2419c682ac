"""addp: ADDP (ICLR 2024) in PyTorch — one image encoder for recognition and generation,
trained by alternating between pixels and VQ tokens at every denoising step."""
from . import models, ops  # noqa: F401  (registers the presets, the timm models and the op fakes)
from .errors import AddpError
from .models.addp import ADDP, ADDPConfig
from .models.checkpoint import CheckpointError, load_checkpoint, load_components, save_checkpoint, save_pretrained
from .models.predictor import MAGEPredictor, PredictorConfig
from .models.registry import create_model, list_models
from .models.tokenizer import VQConfig, VQTokenizer
from .runtime.tuning import tune_for_device
from .sampling.pipeline import ADDPPipeline

__version__ = "0.1.0"
__all__ = [
    "ADDP", "ADDPPipeline", "ADDPConfig", "AddpError", "CheckpointError", "MAGEPredictor", "PredictorConfig",
    "VQConfig", "VQTokenizer", "create_model", "list_models", "load_checkpoint",
    "load_components", "save_checkpoint", "save_pretrained", "tune_for_device",
]
