"""Semantic segmentation metrics from a confusion matrix: mIoU, pixel accuracy, mean accuracy.

IoU_c = TP_c / (TP_c + FP_c + FN_c) over the classes present in the labels or the predictions
(a class absent from both has no IoU and is left out of the mean, as mmsegmentation's NaN-mean);
ignored pixels (255) count nowhere.
"""
from __future__ import annotations

import torch

from .segmentation import IGNORE


def confusion(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts: row = label, column = prediction."""
    keep = labels != IGNORE
    index = labels[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_metrics(matrix: torch.Tensor) -> dict:
    """mIoU, pixel accuracy and mean class accuracy (in %), and the per-class IoUs."""
    m = matrix.double()
    tp = m.diag()
    union = m.sum(0) + m.sum(1) - tp
    iou = tp / union  # NaN for a class neither labelled nor predicted
    acc = tp / m.sum(1)
    return {"mIoU": 100 * float(iou.nanmean()), "aAcc": 100 * float(tp.sum() / m.sum()),
            "mAcc": 100 * float(acc.nanmean()), "IoU": [None if v != v else 100 * float(v) for v in iou]}
