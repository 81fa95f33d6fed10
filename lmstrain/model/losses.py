"""Soft dice losses over the WT/TC/ET regions."""

import keras
from keras import ops

SPATIAL_AXES = (1, 2, 3)


def soft_dice(y_true, y_pred, smooth=1e-5):
    """Isensee's weighted dice coefficient of each sample, averaged over its regions.

    ``mean(2 * (sum(t * p) + smooth / 2) / (sum(t) + sum(p) + smooth))`` over the spatial axes.
    One value per sample: Keras averages them over the batch, and under a ``tf.distribute``
    strategy scales each replica's share so that the replicas' gradients sum to the mean (a
    loss that returns one number for the batch is not scaled, and its gradients would add up).
    """
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    intersection = ops.sum(y_true * y_pred, axis=SPATIAL_AXES)
    total = ops.sum(y_true, axis=SPATIAL_AXES) + ops.sum(y_pred, axis=SPATIAL_AXES)
    return ops.mean(2.0 * (intersection + smooth / 2) / (total + smooth), axis=-1)


@keras.saving.register_keras_serializable(package="lmstrain")
class DiceLoss(keras.losses.Loss):
    """``1 - soft_dice``, per sample."""

    def __init__(self, smooth=1e-5, name="dice_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.smooth = smooth

    def call(self, y_true, y_pred):
        return 1.0 - soft_dice(y_true, y_pred, self.smooth)

    def get_config(self):
        return {**super().get_config(), "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="lmstrain")
class DiceBCELoss(DiceLoss):
    """``1 - soft_dice`` plus voxel-wise binary cross-entropy, per sample."""

    def __init__(self, smooth=1e-5, name="dice_bce_loss", **kwargs):
        super().__init__(smooth=smooth, name=name, **kwargs)

    def call(self, y_true, y_pred):
        bce = ops.mean(keras.losses.binary_crossentropy(
            ops.cast(y_true, "float32"), ops.cast(y_pred, "float32")), axis=SPATIAL_AXES)
        return super().call(y_true, y_pred) + bce


def make_loss(config):
    """The loss named by ``config.loss``."""
    cls = {"dice": DiceLoss, "dice_bce": DiceBCELoss}[config.loss.name]
    return cls(smooth=config.loss.smooth)
