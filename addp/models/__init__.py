"""The networks and their files: the VQ tokenizer, the MAGE token predictor, the ADDP network,
the classifiers on its encoder; the preset registry, checkpoint reading/writing, Hub ids and timm."""
from . import addp, classifier, predictor, timm_models, tokenizer  # noqa: F401  (registers the presets and timm models)
