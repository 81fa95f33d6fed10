"""A Keras callback that profiles one training step (for the swap-in timing checks)."""

import keras
import tensorflow as tf


class ProfileStep(keras.callbacks.Callback):
    """Run TensorFlow's profiler around training step ``step``, writing to ``logdir``."""

    def __init__(self, step, logdir):
        super().__init__()
        self.step, self.logdir = step, str(logdir)

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.step:
            tf.profiler.experimental.start(self.logdir)

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.step:
            tf.profiler.experimental.stop()
