"""model.split_concat: the decoder's conv over [skip, upsampled] computed without concatenating
is the same layer as Conv3D(concatenate(...)): same weights, outputs and gradients."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from lmstrain.config import config_from_dict, load_config
from lmstrain.errors import ConfigError
from lmstrain.model import build_model
from lmstrain.model.layers import SplitConcatConv3D

SHAPE = (16, 16, 16)
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def network(name, split, **model):
    """An untrained network of the given form (seeded, so both forms start different)."""
    keras.utils.set_random_seed(int(split))
    config = config_from_dict({"model": {"name": name, "base_filters": 4, "depth": 3,
                                         "split_concat": split, **model}})
    return build_model(config, SHAPE)


def copy_weights(source, target):
    """Copy every weight by its variable path, which the two forms share."""
    by_path = {v.path: v for v in source.weights}
    assert sorted(by_path) == sorted(v.path for v in target.weights)
    for v in target.weights:
        v.assign(by_path[v.path])


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(2, *SHAPE, 4)).astype("float32"),
            (rng.random((2, *SHAPE, 3)) > 0.5).astype("float32"))


def output_and_gradients(model, x, y):
    with tf.GradientTape() as tape:
        out = model(x, training=False)
        loss = tf.reduce_mean((out - y) ** 2)
    grads = tape.gradient(loss, model.trainable_weights)
    return out.numpy(), {v.path: g.numpy() for v, g in zip(model.trainable_weights, grads)}


def test_the_layer_is_a_conv3d_of_the_concatenation_forward_and_backward():
    """In float64, where the two summation orders agree to rounding (float32 sums of 216
    products of O(1) values differ by ~1e-6: the network test below covers float32)."""
    rng = np.random.default_rng(1)
    skip = tf.constant(rng.normal(size=(2, 8, 8, 8, 3)))
    up = tf.constant(rng.normal(size=(2, 8, 8, 8, 5)))
    split = SplitConcatConv3D(6, 3, use_bias=True, name="c", dtype="float64")
    conv = keras.layers.Conv3D(6, 3, padding="same", name="c", dtype="float64")
    split([skip, up])
    conv(tf.concat([skip, up], -1))
    assert [(v.path, v.shape) for v in split.weights] == [(v.path, v.shape) for v in conv.weights]
    assert split.kernel.shape == (3, 3, 3, 8, 6)
    split.bias.assign(rng.normal(size=6))  # zeros would not test the bias
    conv.set_weights(split.get_weights())

    def run(layer, join):
        with tf.GradientTape() as tape:
            tape.watch([skip, up])
            out = layer(join(skip, up))
            loss = tf.reduce_sum(out * tf.cos(out))
        return [out, *tape.gradient(loss, [skip, up, layer.kernel, layer.bias])]

    for a, b in zip(run(split, lambda s, u: [s, u]), run(conv, lambda s, u: tf.concat([s, u], -1))):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name, norm", [("isensee2017", "instance"), ("unet", "instance"),
                                        ("isensee2017", "none"), ("unet", "none")])
def test_both_forms_compute_the_same_outputs_and_weight_gradients(name, norm):
    concat, split = network(name, False, norm=norm), network(name, True, norm=norm)
    assert not any(isinstance(layer, keras.layers.Concatenate) for layer in split.layers)
    merged = [layer for layer in split.layers if isinstance(layer, SplitConcatConv3D)]
    assert [layer.name for layer in merged] == (["dec1_loc1_conv", "dec0_loc1_conv"]
                                                if name == "isensee2017" else
                                                ["dec1_conv1_conv", "dec0_conv1_conv"])
    assert [(v.path, v.shape) for v in split.weights] == [(v.path, v.shape) for v in concat.weights]
    copy_weights(concat, split)
    x, y = inputs()
    out_concat, grads_concat = output_and_gradients(concat, x, y)
    out_split, grads_split = output_and_gradients(split, x, y)
    np.testing.assert_allclose(out_split, out_concat, **TOLERANCE)
    assert grads_split.keys() == grads_concat.keys()
    for path, grad in grads_concat.items():
        np.testing.assert_allclose(grads_split[path], grad, err_msg=path, **TOLERANCE)


def test_a_saved_split_model_loads_with_its_layer(tmp_path):
    """What `predict` and `evaluate` do with a run's checkpoint (a whole .keras model)."""
    model = network("isensee2017", True)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", compile=False)
    assert isinstance(loaded.get_layer("dec0_loc1_conv"), SplitConcatConv3D)
    x, _ = inputs()
    np.testing.assert_allclose(loaded.predict_on_batch(x), model.predict_on_batch(x), **TOLERANCE)


@pytest.mark.parametrize("name", ["isensee2017", "unet"])
@pytest.mark.parametrize("saved_split", [False, True])
def test_weight_files_do_not_cross_forms(tmp_path, name, saved_split):
    """Keras 3 files address a layer's weights by its class and its position among the layers
    of that class (layers/conv3d_7), not by its name, so replacing Conv3D layers by
    SplitConcatConv3D ones moves every later Conv3D: loading fails loudly in both directions.
    Copying by variable path (identical in both forms) moves weights across."""
    source, target = network(name, saved_split), network(name, not saved_split)
    source.save_weights(tmp_path / "model.weights.h5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Keras' notes on the containers it skips
        with pytest.raises(ValueError, match=r"objects could not be loaded"):
            target.load_weights(tmp_path / "model.weights.h5")
    same_form = network(name, saved_split)
    same_form.load_weights(tmp_path / "model.weights.h5")
    copy_weights(source, target)
    x, _ = inputs()
    expected = source.predict_on_batch(x)
    np.testing.assert_allclose(same_form.predict_on_batch(x), expected, **TOLERANCE)
    np.testing.assert_allclose(target.predict_on_batch(x), expected, **TOLERANCE)


def test_the_layer_follows_the_mixed_precision_policy():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer = SplitConcatConv3D(4, 3)
        out = layer([tf.ones((1, 4, 4, 4, 2)), tf.ones((1, 4, 4, 4, 3))])
    finally:
        keras.config.set_dtype_policy(previous)
    assert out.dtype == tf.float16 and layer.kernel.dtype == "float32"
    assert out.shape == (1, 4, 4, 4, 4)


def test_the_config_key_is_a_boolean(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  split_concat: true\n")
    assert load_config(path).model.split_concat is True
    assert load_config(path, ["model.split_concat=false"]).model.split_concat is False
    with pytest.raises(ConfigError, match=r"^model.split_concat: expected true or false, got 3$"):
        load_config(path, ["model.split_concat=3"])
