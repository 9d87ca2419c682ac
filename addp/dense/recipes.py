"""The paper's dense-recognition recipes (ADDP appendix Tab. 18 and 19) for
`addp.detect --recipe` and `addp.segment --recipe`, registered with `addp.recipes`.

Values the tables give are marked "Tab." below. The input sizes and learning rates did not survive
in the appendix's text: the input sizes are those of the protocols the paper follows (ViTDet:
1024 px; BEiT / MAE: 512 px), and the learning rates (lr 1e-4 at the recipe's global batch:
blr 2e-4 for detection, 8e-4 for segmentation) are ViTDet's value for ViT-B, our choice.
"""
from __future__ import annotations

from ..training import recipes

TAB18 = "ADDP paper App. Tab. 18 (COCO, Mask R-CNN); 1024 px input and blr from ViTDet"
TAB19 = "ADDP paper App. Tab. 19 (ADE20k, UperNet); 512 px input and blr from BEiT"


def detection(layer_decay: float, drop_path: float) -> dict:
    return {"epochs": 100.0,  # Tab.
            "global_batch": 128,  # Tab.
            "beta1": 0.9, "beta2": 0.999,  # Tab. AdamW betas
            "weight_decay": 0.1,  # Tab.
            "layer_decay": layer_decay,  # Tab.: 0.8 B / 0.9 L
            "drop_path": drop_path,  # Tab.: 0.1 B / 0.4 L
            "warmup_steps": 250,  # Tab.
            "jitter": (0.1, 2.0),  # Tab. "large-scale jitter": ViTDet's range
            "rel_pos": True,  # Tab. relative position embeddings
            "input_size": 1024, "blr": 2e-4}  # ViTDet's size; lr 1e-4 at batch 128


def segmentation(steps: int) -> dict:
    return {"steps": steps,  # Tab.: 80k B / 40k L
            "warmup_steps": 1500,  # Tab.
            "global_batch": 32,  # Tab.
            "beta1": 0.9, "beta2": 0.999,  # Tab.
            "weight_decay": 0.05,  # Tab.
            "layer_decay": 0.85,  # Tab.
            "drop_path": 0.1,  # Tab.
            "rel_pos": True,  # Tab.
            "jitter": (0.5, 2.0),  # mmsegmentation's ADE20k pipeline
            "input_size": 512, "blr": 8e-4}  # BEiT's size; lr 1e-4 at batch 32


DENSE_RECIPES = (
    recipes.Recipe("detect_vit_base", "detect", TAB18, {"model": "addp_vit_base_patch16", **detection(0.8, 0.1)}),
    recipes.Recipe("detect_vit_large", "detect", TAB18, {"model": "addp_vit_large_patch16", **detection(0.9, 0.4)}),
    recipes.Recipe("segment_vit_base", "segment", TAB19, {"model": "addp_vit_base_patch16", **segmentation(80000)}),
    recipes.Recipe("segment_vit_large", "segment", TAB19, {"model": "addp_vit_large_patch16", **segmentation(40000)}),
)
recipes.RECIPES.update({r.name: r for r in DENSE_RECIPES})
