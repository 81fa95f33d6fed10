"""Training-time metrics: hard dice (threshold 0.5) per region, averaged over samples.

A sample whose truth and prediction are both empty for a region scores 1, as in BraTS.
These are Keras metrics for the training logs; scoring on the original grid lives in
:mod:`lmstrain.evaluation.metrics`.
"""

import keras
from keras import ops

from lmstrain.data.brats import REGIONS


@keras.saving.register_keras_serializable(package="lmstrain")
class RegionDice(keras.metrics.Metric):
    """Mean per-sample hard dice of one region (``region`` in wt, tc, et) or of all (``mean``)."""

    def __init__(self, region="mean", threshold=0.5, name=None, **kwargs):
        super().__init__(name=name or f"dice_{region}", **kwargs)
        self.region = region
        self.threshold = threshold
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth = ops.cast(y_true, "float32") > 0.5
        pred = ops.cast(y_pred, "float32") > self.threshold
        if self.region != "mean":
            index = REGIONS.index(self.region)
            truth, pred = truth[..., index:index + 1], pred[..., index:index + 1]
        axes = (1, 2, 3)
        intersection = ops.sum(ops.cast(truth & pred, "float32"), axis=axes)
        denominator = ops.sum(ops.cast(truth, "float32") + ops.cast(pred, "float32"), axis=axes)
        dice = ops.where(denominator > 0, 2.0 * intersection / ops.maximum(denominator, 1.0), 1.0)
        per_sample = ops.mean(dice, axis=-1)
        self.total.assign_add(ops.sum(per_sample))
        self.count.assign_add(ops.cast(ops.shape(per_sample)[0], "float32"))

    def result(self):
        return self.total / ops.maximum(self.count, 1.0)

    def reset_state(self):
        self.total.assign(0.0)
        self.count.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "region": self.region, "threshold": self.threshold}


def region_metrics():
    """``dice_wt``, ``dice_tc``, ``dice_et`` and ``dice_mean``."""
    return [RegionDice(region) for region in (*REGIONS, "mean")]
