"""model.norm: instance_lean: InstanceNormalization is Keras's GroupNormalization(groups=-1)
with its own gradient: same weights, same outputs, same gradients, and a gradient that does not
run before the backward pass."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from lmstrain.config import config_from_dict
from lmstrain.model import build_model
from lmstrain.model.layers import InstanceNormalization

SHAPE = (16, 16, 16)


def test_the_layer_is_keras_instance_normalisation_forward_and_backward():
    """In float64, where the two formulas of the gradient agree to rounding."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(2.0, 3.0, size=(2, 6, 5, 4, 3)))
    weights = tf.constant(rng.normal(size=x.shape))
    lean = InstanceNormalization(name="n", dtype="float64")
    keras_norm = keras.layers.GroupNormalization(groups=-1, name="n", dtype="float64")
    lean.build(x.shape)
    keras_norm.build(x.shape)
    assert [(v.path, v.shape) for v in lean.weights] == [(v.path, v.shape)
                                                         for v in keras_norm.weights]
    gamma, beta = rng.normal(1.0, 0.3, size=3), rng.normal(0.0, 0.3, size=3)
    for layer in (lean, keras_norm):  # ones and zeros would not test gamma and beta
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)

    def run(layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x)
            loss = tf.reduce_sum(out * weights * out)
        return [out, *tape.gradient(loss, [x, layer.gamma, layer.beta])]

    for a, b in zip(run(lean), run(keras_norm)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["isensee2017", "unet"])
def test_networks_with_either_norm_compute_the_same(name):
    def network(norm):
        keras.utils.set_random_seed(0)
        config = config_from_dict({"model": {"name": name, "base_filters": 4, "depth": 3,
                                             "norm": norm}})
        return build_model(config, SHAPE)

    lean, reference = network("instance_lean"), network("instance")
    assert [(v.path, v.shape) for v in lean.weights] == [(v.path, v.shape)
                                                         for v in reference.weights]
    rng = np.random.default_rng(1)
    for a, b in zip(lean.weights, reference.weights):
        b.assign(a + rng.normal(0.0, 0.1, size=a.shape))  # gamma and beta away from 1 and 0
        a.assign(b)
    x = rng.normal(size=(2, *SHAPE, 4)).astype("float32")
    y = (rng.random((2, *SHAPE, 3)) > 0.5).astype("float32")
    results = []
    for model in (lean, reference):
        with tf.GradientTape() as tape:
            out = model(x, training=False)
            loss = tf.reduce_mean((out - y) ** 2)
        results.append([out, *tape.gradient(loss, model.trainable_weights)])
    for path, a, b in zip(["output"] + [v.path for v in lean.trainable_weights], *results):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6, err_msg=path)


def test_the_gradient_waits_for_the_backward_pass():
    """Its ops read the forward input but must not run as soon as it exists: each one depends
    on the incoming gradient (else the executor would hold a normalised copy of every layer's
    input from the forward pass on)."""
    layer = InstanceNormalization()
    x = tf.random.normal((1, 4, 4, 4, 2))
    layer.build(x.shape)

    @tf.function
    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            dy = tf.identity(tf.ones_like(x), name="incoming")
            out = tf.identity(layer(x), name="forward")
            loss = tf.reduce_sum(out * dy)
        return tape.gradient(loss, x)

    graph = gradient.get_concrete_function(x).graph
    incoming = graph.get_operation_by_name("incoming")

    def ancestors(op, seen):
        for pred in [t.op for t in op.inputs] + list(op.control_inputs):
            if pred not in seen:
                seen.add(pred)
                ancestors(pred, seen)
        return seen

    forward = ancestors(graph.get_operation_by_name("forward"), set())
    readers = [op for op in graph.get_operations()
               if op not in forward and op.type in ("Sub", "Rsqrt")]  # x - mean, 1 / std
    assert len(readers) == 3  # and dy - ...
    for op in readers:
        assert incoming in ancestors(op, set()), op.name


def test_the_layer_follows_the_mixed_precision_policy_and_reloads(tmp_path):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer = InstanceNormalization()
        out = layer(tf.ones((1, 4, 4, 4, 2)))
    finally:
        keras.config.set_dtype_policy(previous)
    assert out.dtype == tf.float16 and layer.gamma.dtype == "float32"
    config = config_from_dict({"model": {"base_filters": 4, "depth": 3,
                                         "norm": "instance_lean"}})
    model = build_model(config, SHAPE)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", compile=False)
    assert isinstance(loaded.get_layer("enc0_in_norm"), InstanceNormalization)
    x = np.random.default_rng(0).normal(size=(1, *SHAPE, 4)).astype("float32")
    np.testing.assert_array_equal(loaded.predict_on_batch(x), model.predict_on_batch(x))


def test_weight_files_do_not_cross_norms(tmp_path):
    """As with model.split_concat: Keras 3 files address weights by layer class and rank, so
    a GroupNormalization network's file does not load into an instance_lean one; copying by
    variable path (the same in both) does."""
    def network(norm):
        config = config_from_dict({"model": {"base_filters": 4, "depth": 3, "norm": norm}})
        return build_model(config, SHAPE)

    source, target = network("instance"), network("instance_lean")
    source.save_weights(tmp_path / "model.weights.h5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Keras' notes on the containers it skips
        with pytest.raises(ValueError, match=r"objects could not be loaded"):
            target.load_weights(tmp_path / "model.weights.h5")
    by_path = {v.path: v for v in source.weights}
    for v in target.weights:
        v.assign(by_path[v.path])
    x = np.random.default_rng(0).normal(size=(1, *SHAPE, 4)).astype("float32")
    np.testing.assert_allclose(target.predict_on_batch(x), source.predict_on_batch(x),
                               rtol=1e-5, atol=1e-6)
