"""SplitConcatConv3D: a Conv3D over ``concatenate([skip, up])`` that never concatenates.

A convolution is linear in its input channels, so convolving the concatenation with a kernel
equals the sum of convolving each part with its slice of the kernel's input channels. The layer
owns the one kernel a ``Conv3D`` would own for the concatenated input (same shape, name and
initialisers), so the two forms are the same layer with the same weights; this one only skips
materialising the concatenated tensor (``model.split_concat``).

InstanceNormalization: Keras's ``GroupNormalization(groups=-1)`` with a gradient that holds three
full-size tensors instead of four (``model.norm: instance_lean``).

RecomputedModule: a module's layers run under ``tf.recompute_grad`` (``model.remat: blocks``).
"""

import keras
import tensorflow as tf
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


@keras.saving.register_keras_serializable(package="lmstrain")
class InstanceNormalization(keras.layers.Layer):
    """Instance normalisation (one group per channel, channels_last), as
    ``keras.layers.GroupNormalization(groups=-1)`` computes it forward, with its own gradient.

    TensorFlow's automatic gradient of the Keras layer broadcasts the gradients of the mean
    and of the variance back to full size, so the input's gradient is a sum of three
    full-size terms made while the input itself is live again: four full-size tensors at
    once. Here the gradient is ``dx = rstd * gamma * (dy - (sum(dy) + xhat * sum(dy * xhat))
    / n)``, with ``xhat`` recomputed from the input: ``dy``, ``xhat`` and ``dy * xhat`` at
    most, each later step written into a buffer it replaces. The weights (``gamma``,
    ``beta``) have the Keras layer's shapes, names and initialisers.
    """

    def __init__(self, epsilon=1e-3, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        channels = int(input_shape[-1])
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros")

    def call(self, inputs):
        dtype = keras.backend.result_type(inputs.dtype, "float32")  # as GroupNormalization
        outputs = _instance_norm(ops.cast(inputs, dtype), ops.cast(self.gamma, dtype),
                                 ops.cast(self.beta, dtype), self.epsilon)
        return ops.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def _instance_norm(x, gamma, beta, epsilon):
    """``InstanceNormalization``'s arithmetic on tensors ``(batch, *spatial, channels)``."""
    axes = list(range(1, len(x.shape) - 1))

    @tf.custom_gradient
    def normalise(x, gamma, beta):
        mean, variance = tf.nn.moments(x, axes, keepdims=True)
        inv = tf.math.rsqrt(variance + epsilon) * gamma
        outputs = x * inv + (beta - mean * inv)

        def gradient(dy):
            with tf.control_dependencies([dy]):  # not in the forward pass, as soon as x is
                rstd = tf.math.rsqrt(variance + epsilon)
                xhat = (x - mean) * rstd
            n = tf.cast(tf.reduce_prod(tf.shape(x)[1:-1]), x.dtype)
            sum_dy = tf.reduce_sum(dy, axes, keepdims=True)
            sum_dy_xhat = tf.reduce_sum(dy * xhat, axes, keepdims=True)
            dx = (dy - (xhat * sum_dy_xhat + sum_dy) / n) * (rstd * gamma)
            batch_axes = [0, *axes]
            return (dx, tf.reduce_sum(sum_dy_xhat, batch_axes),
                    tf.reduce_sum(sum_dy, batch_axes))

        return outputs, gradient

    return normalise(x, gamma, beta)


@keras.saving.register_keras_serializable(package="lmstrain")
class RecomputedModule(keras.layers.Layer):
    """A module whose activations are recomputed in the backward pass (``tf.recompute_grad``,
    ``model.remat: blocks``): the gradient keeps only the module's inputs, and runs the
    module's layers a second time to get the rest.

    ``stages`` are applied in order; the first may take a list of inputs (a
    :class:`SplitConcatConv3D`). A ``SpatialDropout3D`` stage draws its mask outside the
    recomputed function and passes it in, so the recomputation uses the mask of the forward
    pass (a dropout inside would draw a new one and give wrong gradients). Layers that update
    state in training (batch normalisation) would update it twice: not allowed.
    """

    def __init__(self, stages, **kwargs):
        super().__init__(**kwargs)
        self.stages = [keras.layers.deserialize(s) if isinstance(s, dict) else s
                       for s in stages]
        if any(isinstance(s, keras.layers.BatchNormalization) for s in self.stages):
            raise ValueError("RecomputedModule cannot hold BatchNormalization: the recomputation "
                             "would update its moving statistics twice")

    def build(self, input_shape):
        self._stage_shapes = []  # each stage's input shape
        shape = input_shape
        for stage in self.stages:
            self._stage_shapes.append(shape)
            if not stage.built:  # deserialised stages come built
                stage.build(shape)
            shape = stage.compute_output_shape(shape)

    def compute_output_shape(self, input_shape):
        for stage in self.stages:
            input_shape = stage.compute_output_shape(input_shape)
        return input_shape

    def call(self, inputs, training=None):
        inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        batch = ops.shape(inputs[0])[0]
        masks = [stage(ops.ones((batch, 1, 1, 1, shape[-1]), dtype=inputs[0].dtype),
                       training=training)
                 for stage, shape in zip(self.stages, self._stage_shapes)
                 if isinstance(stage, keras.layers.SpatialDropout3D)]

        def forward(*tensors):
            x = list(tensors[:len(inputs)]) if len(inputs) > 1 else tensors[0]
            given = iter(tensors[len(inputs):])
            for stage in self.stages:
                is_dropout = isinstance(stage, keras.layers.SpatialDropout3D)
                x = ops.multiply(x, next(given)) if is_dropout else stage(x)
            return x

        return tf.recompute_grad(forward)(*inputs, *masks)

    def get_config(self):
        return {**super().get_config(),
                "stages": [keras.layers.serialize(s) for s in self.stages]}
