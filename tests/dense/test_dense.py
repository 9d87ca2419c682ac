"""Dense recognition: the ViTDet backbone loads the official encoder layout and reduces to the
plain encoder, COCO metrics are COCOeval's, mIoU matches a hand count, recipes match the
appendix, bad input is one line."""
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import addp
from addp.models.registry import preset_config
from addp.training import recipes
from addp.dense import recipes as dense_recipes
from addp.dense.ade import AdeSegmentation
from addp.dense.backbone import ViTDetBackbone, backbone_config_for, load_encoder
from addp.dense.coco import CocoInstances, coco_metrics, quiet, read_coco
from addp.dense.detection import Detector, DetectorConfig
from addp.dense.metrics import confusion, segmentation_metrics
from addp.dense.segmentation import Segmenter, SegmenterConfig
from addp.errors import AddpError

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from test_official_layout import fake_state, official_keys  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_official_addp_b_encoder_loads_strictly_into_both_backbones(task):
    state = fake_state({k: v for k, v in official_keys("addp_vit_base_patch16").items()
                        if not k.startswith(("vqgan.", "token_predictor."))})
    cfg = backbone_config_for(preset_config("addp_vit_base_patch16"), 64, task)
    assert cfg.global_blocks == (2, 5, 8, 11) and cfg.window_size == 14  # ViTDet's split
    assert cfg.out_indices == ((11,) if task == "detection" else (3, 5, 7, 11))  # BEiT's blocks
    bb = ViTDetBackbone(cfg)
    new = load_encoder(bb, state, "addp-vit-base-16.pth")
    assert sorted(new) == sorted(f"blocks.{i}.attn.rel_pos_{a}" for i in range(12) for a in "hw")
    assert torch.equal(bb.blocks[7].attn.qkv.weight, state["blocks.7.attn.qkv.weight"])
    assert torch.equal(bb.tokenizer_norm.bias, state["tokenizer_norm.bias"])
    with pytest.raises(AddpError, match="does not fit"):
        load_encoder(bb, {**state, "blocks.12.norm1.weight": torch.ones(768)}, "x")


def test_large_split_is_vitdets():
    cfg = backbone_config_for(preset_config("addp_vit_large_patch16"), 1024, "segmentation")
    assert cfg.global_blocks == (5, 11, 17, 23) and cfg.out_indices == (7, 11, 15, 23)


def test_global_attention_at_zero_rel_pos_is_the_plain_encoder():
    torch.manual_seed(0)
    net = addp.create_model("addp_vit_small").eval()
    cfg = backbone_config_for(net.config, 32, "detection")
    bb = ViTDetBackbone(dataclasses.replace(cfg, global_blocks=(0, 1, 2, 3))).eval()
    load_encoder(bb, net.state_dict(), "ours")
    x = torch.rand(2, 3, 32, 32)
    ref = net.forward_encoder(x)  # (B, N, C)
    out = bb((x - net.pixel_mean) / net.pixel_std)[-1].flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    # windows change it; a non-zero relative position table changes it
    windowed = ViTDetBackbone(cfg).eval()
    load_encoder(windowed, net.state_dict(), "ours")
    with torch.no_grad():
        windowed.blocks[0].attn.window = 2
        assert not torch.allclose(windowed((x - net.pixel_mean) / net.pixel_std)[-1].flatten(2).transpose(1, 2), ref)


def test_models_build_and_train_one_step_on_larger_inputs():
    net_cfg = preset_config("addp_vit_small")
    b = dataclasses.asdict(backbone_config_for(net_cfg, 64, "detection"))
    det = Detector(DetectorConfig(backbone=b, num_classes=3, out_channels=32, fc_dim=64, anchor_size=8,
                                  proposals=(64, 32), rois_per_image=32))
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 12:40] = 1
    losses = det([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[12.0, 10, 40, 30]]), "labels": torch.tensor([2]),
                                             "masks": masks}])
    assert set(losses) >= {"loss_mask", "loss_box_reg", "loss_objectness"}
    sum(losses.values()).backward()
    s = dataclasses.asdict(backbone_config_for(net_cfg, 64, "segmentation"))
    seg = Segmenter(SegmenterConfig(backbone=s, num_classes=5, decoder_channels=32))
    assert seg(torch.rand(2, 3, 64, 96)).shape == (2, 5, 64, 96)


def test_tiled_positions_repeat_the_stored_grid_and_interpolation_stretches_it():
    torch.manual_seed(0)
    cfg = backbone_config_for(preset_config("addp_vit_small"), 96, "detection", abs_pos="tile")
    bb = ViTDetBackbone(cfg)
    side = bb.patch_embed.grid_size[0]  # the pretraining grid (8 for 32 px, patch 4)
    stored = bb.pos_embed[0, 1:].reshape(side, side, -1)
    for h, w in [(24, 24), (13, 21), (side, side)]:
        table = bb.position_table((h, w))
        assert table.shape == (1, 1 + h * w, cfg.embed_dim)
        torch.testing.assert_close(table[0, 0], bb.pos_embed[0, 0])  # the class token's own
        grid = table[0, 1:].reshape(h, w, -1)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        torch.testing.assert_close(grid, stored[ys % side, xs % side])
    interpolated = ViTDetBackbone(dataclasses.replace(cfg, abs_pos="interpolate"))
    interpolated.load_state_dict(bb.state_dict())
    torch.testing.assert_close(interpolated.position_table((side, side)), bb.pos_embed)  # same at the stored size
    assert not torch.allclose(interpolated.position_table((24, 24)), bb.position_table((24, 24)))
    with pytest.raises(AddpError, match="abs_pos must be one of"):
        dataclasses.replace(cfg, abs_pos="mean")


def test_fine_patch_segmenter_builds_every_level_from_the_last_block():
    """Patch 4: one map, the last block's, feeds the four levels at strides 4..32; patch 16
    keeps BEiT's four blocks."""
    cfg = backbone_config_for(preset_config("addp_vit_small"), 96, "segmentation")
    assert cfg.out_indices == (cfg.depth - 1,)
    seg = Segmenter(SegmenterConfig(backbone=dataclasses.asdict(cfg), num_classes=11, decoder_channels=16)).eval()
    x = torch.rand(1, 3, 96, 96)
    maps = seg.encoder(seg.normalise(x))
    levels = seg.neck(maps)
    assert [m.shape[-1] for m in levels] == [96 // s for s in (4, 8, 16, 32)]
    torch.testing.assert_close(levels[0], maps[0])  # stride 4 is the patch-4 map itself
    torch.testing.assert_close(levels[3], torch.nn.functional.max_pool2d(maps[0], 8))


def test_tuning_canvases_draw_both_splits_from_the_training_digits(tmp_path):
    from addp.dense.canvas import build_canvases
    from addp.training.data import load_digits
    build_canvases(tmp_path / "report", size=64, train=2, val=2)
    build_canvases(tmp_path / "tune", size=64, train=2, val=2, tuning=True)
    read = lambda root, split: np.asarray(Image.open(root / "coco" / split / "000000.png"))
    assert not np.array_equal(read(tmp_path / "report", "val2017"), read(tmp_path / "tune", "val2017"))
    image = read(tmp_path / "tune", "val2017")
    assert image.dtype == np.uint8 and (image[..., 0] == image[..., 1]).all()  # grey, as the pretraining digits
    assert len(load_digits("train")[1]) > len(load_digits("heldout")[1])


# -- metrics ---------------------------------------------------------------------------------
def _gt(tmp_path):
    anns = []
    for i, (x, y, w, h) in enumerate([(5, 5, 20, 20), (40, 30, 15, 25), (10, 40, 30, 12)]):
        m = np.zeros((64, 64), np.uint8)
        m[y:y + h, x:x + w] = 1
        rle = mask_utils.encode(np.asfortranarray(m))
        anns.append({"id": i + 1, "image_id": 1 + i % 2, "category_id": 1 + i % 2, "iscrowd": 0, "area": w * h,
                     "bbox": [x, y, w, h], "segmentation": {"size": [64, 64], "counts": rle["counts"].decode()}})
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64},
                       {"id": 2, "file_name": "b.png", "width": 64, "height": 64}],
            "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path, data


def test_coco_metrics_are_cocoevals(tmp_path):
    path, data = _gt(tmp_path)
    g = np.random.default_rng(0)
    results = []
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        for j in range(3):
            box = [x + g.normal(0, 2), y + g.normal(0, 2), w + g.normal(0, 3), h + g.normal(0, 3)]
            results.append({"image_id": a["image_id"], "category_id": a["category_id"] if j < 2 else 3 - a["category_id"],
                            "bbox": box, "score": float(g.uniform()), "segmentation": a["segmentation"]})
    gt = quiet(COCO, str(path))
    ours = coco_metrics(gt, results)
    for iou in ("bbox", "segm"):
        ev = COCOeval(gt, quiet(gt.loadRes, [dict(r) for r in results]), iou)
        quiet(ev.evaluate), quiet(ev.accumulate), quiet(ev.summarize)
        expected = [100 * v if v >= 0 else -1.0 for v in ev.stats[:6]]
        assert [ours[f"{iou}_{n}"] for n in ("AP", "AP50", "AP75", "APs", "APm", "APl")] == pytest.approx(expected)
    assert 0 < ours["bbox_AP"] < 100


def test_miou_is_the_hand_count():
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    m = confusion(pred, labels, 3)
    assert m.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]
    # IoU: class 0: 1 / (2 + 2 - 1) ; class 1: 2 / (3 + 3 - 2) ; class 2: 1 / (2 + 2 - 1)
    r = segmentation_metrics(m)
    assert r["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 4 + 1 / 3) / 3)
    assert r["aAcc"] == pytest.approx(100 * 4 / 7)


# -- recipes ---------------------------------------------------------------------------------
def test_recipes_are_the_appendix_tables():
    r = recipes.RECIPES
    for name, ld, dp in (("detect_vit_base", 0.8, 0.1), ("detect_vit_large", 0.9, 0.4)):
        s = r[name].settings  # Tab. 18
        assert (s["epochs"], s["global_batch"], s["beta1"], s["beta2"], s["weight_decay"], s["warmup_steps"]) == \
            (100, 128, 0.9, 0.999, 0.1, 250)
        assert (s["layer_decay"], s["drop_path"], s["rel_pos"], s["jitter"]) == (ld, dp, True, (0.1, 2.0))
    for name, steps in (("segment_vit_base", 80000), ("segment_vit_large", 40000)):
        s = r[name].settings  # Tab. 19
        assert (s["steps"], s["warmup_steps"], s["global_batch"], s["beta1"], s["beta2"]) == (steps, 1500, 32, 0.9, 0.999)
        assert (s["weight_decay"], s["layer_decay"], s["drop_path"], s["rel_pos"]) == (0.05, 0.85, 0.1, True)
    assert "Tab. 18" in dense_recipes.TAB18 and "Tab. 19" in dense_recipes.TAB19


# -- bad input -------------------------------------------------------------------------------
def _coco_root(tmp_path, data):
    (tmp_path / "annotations").mkdir(exist_ok=True)
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    (tmp_path / "val2017").mkdir(exist_ok=True)
    return tmp_path


def test_coco_bad_input_and_documented_skips(tmp_path):
    from PIL import Image
    _, data = _gt(tmp_path)
    root = _coco_root(tmp_path, data)
    with pytest.raises(AddpError, match="2 listed images are not in"):
        read_coco(root, "val2017")
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64)).save(root / "val2017" / name)
    # polygons and RLE in one file; a box outside the image (clipped) and one of zero size (skipped)
    data["annotations"][1]["segmentation"] = [[40, 30, 55, 30, 55, 55, 40, 55]]
    data["annotations"][0]["bbox"] = [50, 50, 40, 40]
    data["annotations"].append({**data["annotations"][2], "id": 9, "bbox": [70, 70, 5, 5]})
    _coco_root(tmp_path, data)
    ds = CocoInstances(root, "val2017", 64)
    _, t, _ = ds[0]
    assert t["boxes"].tolist() == [[50, 50, 64, 64], [10, 40, 40, 52]] and t["masks"].shape == (2, 64, 64)
    _, t, _ = ds[1]
    assert t["masks"][0].sum() == 15 * 25  # the polygon's pixels
    data["annotations"].append({**data["annotations"][2], "id": 10, "image_id": 7})
    _coco_root(tmp_path, data)
    with pytest.raises(AddpError, match="names image 7"):
        read_coco(root, "val2017")


def test_ade_bad_input(tmp_path):
    from PIL import Image
    for d in ("images/validation", "annotations/validation"):
        (tmp_path / d).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images/validation/a.jpg")
    with pytest.raises(AddpError, match="unpaired"):
        AdeSegmentation(tmp_path, "validation", 3, 8)
    Image.fromarray(np.full((8, 8), 4, np.uint8)).save(tmp_path / "annotations/validation/a.png")
    with pytest.raises(AddpError, match="label 4 beyond the 3 classes"):
        AdeSegmentation(tmp_path, "validation", 3, 8)[0]
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "annotations/validation/a.png")
    with pytest.raises(AddpError, match="is 8x6 but its image"):
        AdeSegmentation(tmp_path, "validation", 3, 8)[0]
    Image.fromarray(np.array([[0, 1, 3, 2]] * 8, np.uint8).repeat(2, 1)).save(tmp_path / "annotations/validation/a.png")
    _, labels, _ = AdeSegmentation(tmp_path, "validation", 3, 8)[0]
    assert labels[0].tolist() == [255, 255, 0, 0, 2, 2, 1, 1]


def test_load_checkpoint_returns_a_dense_model_saved_alone(tmp_path):
    from addp.models.checkpoint import load_checkpoint, save_checkpoint
    cfg = backbone_config_for(preset_config("addp_vit_small"), 32, "segmentation")
    seg = Segmenter(SegmenterConfig(backbone=dataclasses.asdict(cfg), num_classes=3, decoder_channels=8))
    loaded = load_checkpoint(save_checkpoint(tmp_path / "segmenter.safetensors", {"segmenter": seg}))
    assert isinstance(loaded, Segmenter)
    torch.testing.assert_close(loaded.classifier.weight, seg.classifier.weight)
