"""Segmentation metrics on boolean volumes: Dice, HD95 (mm) and sensitivity.

This is the project's one implementation of these metrics (the Keras training metric in
:mod:`lmstrain.model.metrics` is a TensorFlow running average for the training logs).

>>> import numpy as np
>>> a = np.zeros((4, 4, 4), bool); a[1:3, 1:3, 1:3] = True
>>> dice(a, a), hd95(a, a, (1, 1, 1)), sensitivity(a, a)
(1.0, 0.0, 1.0)
"""

import numpy as np
from scipy import ndimage

from lmstrain.data.brats import REGIONS

METRICS = ("dice", "hd95", "sensitivity")


def dice(pred, truth):
    """``2|P∩T| / (|P| + |T|)``; 1 when both are empty."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2.0 * (pred & truth).sum() / total)


def hd95(pred, truth, spacing):
    """95th-percentile Hausdorff distance in mm between the surfaces of ``pred`` and ``truth``.

    The larger of the two directed 95th percentiles of surface-to-surface distances, with
    distances from scipy's Euclidean distance transform at the voxel ``spacing``. Both empty:
    0; exactly one empty: inf.
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return float("inf")
    crop = _union_box(pred | truth)
    pred, truth = pred[crop], truth[crop]
    pred_surface, truth_surface = _surface(pred), _surface(truth)
    to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return float(max(np.percentile(to_truth[pred_surface], 95),
                     np.percentile(to_pred[truth_surface], 95)))


def sensitivity(pred, truth):
    """``|P∩T| / |T|``, the share of the truth that was found; 1 when the truth is empty."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    return 1.0 if not truth.any() else float((pred & truth).sum() / truth.sum())


def score_regions(pred, truth, spacing):
    """Every metric for each region of ``(X, Y, Z, 3)`` WT/TC/ET masks: ``{"dice_wt": ...}``."""
    scores = {}
    for i, region in enumerate(REGIONS):
        p, t = pred[..., i].astype(bool), truth[..., i].astype(bool)
        scores[f"dice_{region}"] = dice(p, t)
        scores[f"hd95_{region}"] = hd95(p, t, spacing)
        scores[f"sensitivity_{region}"] = sensitivity(p, t)
    return scores


def _surface(mask):
    eroded = ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 1), border_value=0)
    return mask & ~eroded


def _union_box(mask, margin=1):
    """Slices of the bounding box of ``mask`` plus a margin (distances inside are unchanged)."""
    idx = np.nonzero(mask)
    return tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1) for i in idx)
