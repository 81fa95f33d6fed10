"""SplitConcatConv3D: a Conv3D over ``concatenate([skip, up])`` that never concatenates.

A convolution is linear in its input channels, so convolving the concatenation with a kernel
equals the sum of convolving each part with its slice of the kernel's input channels. The layer
owns the one kernel a ``Conv3D`` would own for the concatenated input (same shape, name and
initialisers), so the two forms are the same layer with the same weights; this one only skips
materialising the concatenated tensor (``model.split_concat``).
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="lmstrain")
class SplitConcatConv3D(keras.layers.Layer):
    """``Conv3D(filters, kernel_size, padding="same")`` applied to the channel concatenation of
    the two inputs ``[skip, up]`` (channels_last, stride 1), computed as
    ``conv(skip, kernel[..., :c_skip, :]) + conv(up, kernel[..., c_skip:, :])``."""

    def __init__(self, filters, kernel_size=3, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.use_bias = bool(use_bias)

    def build(self, input_shape):
        skip_shape, up_shape = input_shape
        self.skip_channels = int(skip_shape[-1])
        channels = self.skip_channels + int(up_shape[-1])
        self.kernel = self.add_weight(
            name="kernel", shape=(*(self.kernel_size,) * 3, channels, self.filters),
            initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(self.filters,),
                                    initializer="zeros") if self.use_bias else None

    def call(self, inputs):
        skip, up = inputs
        c = self.skip_channels
        outputs = ops.add(ops.conv(skip, self.kernel[..., :c, :], padding="same"),
                          ops.conv(up, self.kernel[..., c:, :], padding="same"))
        if self.use_bias:
            outputs = ops.add(outputs, ops.reshape(self.bias, (1, 1, 1, 1, self.filters)))
        return outputs

    def compute_output_shape(self, input_shape):
        return (*input_shape[0][:-1], self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "kernel_size": self.kernel_size, "use_bias": self.use_bias}
