"""addp: ADDP (ICLR 2024) in PyTorch — one image encoder for recognition and generation,
trained by alternating between pixels and VQ tokens at every denoising step."""
from . import classifier, model, ops, predictor, timm_models, tokenizer  # noqa: F401  (register presets, timm models, op fakes)
from .checkpoint import CheckpointError, load_checkpoint, load_components, save_checkpoint, save_pretrained
from .model import ADDP, ADDPConfig
from .predictor import MAGEPredictor, PredictorConfig
from .errors import AddpError
from .registry import create_model, list_models
from .tokenizer import VQConfig, VQTokenizer
from .tuning import tune_for_device

__version__ = "0.1.0"
__all__ = [
    "ADDP", "ADDPConfig", "AddpError", "CheckpointError", "MAGEPredictor", "PredictorConfig",
    "VQConfig", "VQTokenizer", "create_model", "list_models", "load_checkpoint",
    "load_components", "save_checkpoint", "save_pretrained", "tune_for_device",
]
