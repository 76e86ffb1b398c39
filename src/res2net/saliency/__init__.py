"""Salient object detection on Res2Net features, as in the paper's experiments: a compact
FPN-style decoder predicting a one-channel mask at input resolution, trained with BCE + IoU loss
on folders of image/mask pairs, and the benchmark metrics (MAE, max F-measure, beta^2 = 0.3).

Data layout (one folder per split)::

    DIR/images/<name>.jpg   (any common image format)
    DIR/masks/<name>.png    (same stem; white = salient, black = background)
"""

from .data import SaliencyFolder, find_pairs
from .engine import (
    evaluate_saliency,
    load_saliency_model,
    predict_saliency,
    saliency_geometry,
    saliency_mask,
    save_saliency_model,
    train_saliency,
)
from .losses import bce_iou_loss, iou_loss
from .metrics import SaliencyMetrics, f_measure_curve, mae
from .model import SaliencyDecoder, SaliencyNet, saliency_res2net

__all__ = [
    "SaliencyDecoder",
    "SaliencyFolder",
    "SaliencyMetrics",
    "SaliencyNet",
    "bce_iou_loss",
    "evaluate_saliency",
    "f_measure_curve",
    "find_pairs",
    "iou_loss",
    "load_saliency_model",
    "mae",
    "predict_saliency",
    "saliency_geometry",
    "saliency_mask",
    "saliency_res2net",
    "save_saliency_model",
    "train_saliency",
]
