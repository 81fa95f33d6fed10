"""model.remat: blocks recomputes each context and localisation module of isensee2017 in the
backward pass (tf.recompute_grad): the same weights, outputs and gradients as the plain
network, and it trains in model.fit; keras_activations builds inside keras.RematScope."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from lmstrain.config import config_from_dict
from lmstrain.errors import ConfigError
from lmstrain.model import build_model
from lmstrain.model.layers import RecomputedModule
from lmstrain.model.training import training_model

SHAPE = (16, 16, 16)


def network(remat, **model):
    """The network with ``remat``; seeded alike, so both forms draw the same dropout masks."""
    keras.utils.set_random_seed(0)
    config = config_from_dict({"model": {"base_filters": 4, "depth": 3, "dropout": 0.3,
                                         "remat": remat, **model}})
    return build_model(config, SHAPE)


def layer_path(variable):
    """A variable's path without the module that holds it (``enc0_context/``)."""
    return "/".join(variable.path.split("/")[-2:])


def copy_weights(source, target):
    by_path = {layer_path(v): v for v in source.weights}
    assert sorted(by_path) == sorted(layer_path(v) for v in target.weights)
    for v in target.weights:
        v.assign(by_path[layer_path(v)])


def output_and_gradients(model, x, y):
    """The training-mode output and the weights' gradients, in a traced function (graph mode,
    as in model.fit)."""
    @tf.function
    def step():
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = tf.reduce_mean((out - y) ** 2 * tf.range(1.0, 4.0))
        return out, tape.gradient(loss, model.trainable_weights)

    out, grads = step()
    return out.numpy(), {layer_path(v): g.numpy() for v, g in zip(model.trainable_weights, grads)}


@pytest.mark.parametrize("split_concat", [False, True])
def test_blocks_compute_the_same_outputs_and_gradients(split_concat):
    plain, blocks = network("none", split_concat=split_concat), \
        network("blocks", split_concat=split_concat)
    modules = [layer for layer in blocks.layers if isinstance(layer, RecomputedModule)]
    assert len(modules) == 3 + 2  # a context module per level, a localisation one per decoder
    copy_weights(plain, blocks)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, *SHAPE, 4)).astype("float32"))
    y = tf.constant((rng.random((2, *SHAPE, 3)) > 0.5).astype("float32"))
    out_plain, grads_plain = output_and_gradients(plain, x, y)
    out_blocks, grads_blocks = output_and_gradients(blocks, x, y)
    np.testing.assert_allclose(out_blocks, out_plain, rtol=1e-5, atol=1e-6)
    assert grads_blocks.keys() == grads_plain.keys()
    for path, grad in grads_plain.items():
        assert np.abs(grad).max() > 0, path  # every weight is reached (dropout kept some)
        np.testing.assert_allclose(grads_blocks[path], grad, rtol=1e-4, atol=1e-6,
                                   err_msg=path)


def fit(remat):
    """Two epochs of two steps of the network with ``remat``; its weights before and after,
    and the losses."""
    config = config_from_dict({"model": {"base_filters": 4, "depth": 3, "remat": remat}})
    keras.utils.set_random_seed(0)
    model = training_model(config, SHAPE, steps_per_epoch=2)
    before = [w.copy() for w in model.get_weights()]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, *SHAPE, 4)).astype("float32")
    y = (rng.random((2, *SHAPE, 3)) > 0.5).astype("float32")
    history = model.fit(x, y, batch_size=1, epochs=2, verbose=0)
    return before, model.get_weights(), history.history["loss"]


@pytest.mark.parametrize("remat", ["blocks", "keras_activations", "keras_layers"])
def test_remat_networks_train_in_model_fit(remat):
    before, after, losses = fit(remat)
    assert np.isfinite(losses).all()
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("remat", ["keras_full", "keras_larger_than"])
def test_keras_remat_scopes_that_wrap_the_model_fail_in_model_fit(remat):
    """Keras 3.15 also rematerialises Functional.call, which model.fit calls with training=:
    what the config's help text says (this test fails once Keras fixes it)."""
    with pytest.raises(ValueError, match="custom_gradient decorator currently supports "
                                         "keywords arguments only when eager execution"):
        fit(remat)


def test_blocks_needs_isensee2017_without_batch_normalisation():
    with pytest.raises(ConfigError, match=r"^model.remat: blocks .* got model.name unet"):
        network("blocks", name="unet")
    with pytest.raises(ConfigError, match=r"model.norm batch"):
        network("blocks", norm="batch")


def test_blocks_save_and_load_as_keras_files(tmp_path):
    """fit's checkpoints and predict's load_model: the modules round-trip with their weights."""
    model = network("blocks")
    model.save(tmp_path / "blocks.keras")
    loaded = keras.saving.load_model(tmp_path / "blocks.keras", compile=False)
    x = np.random.default_rng(0).normal(size=(1, *SHAPE, 4)).astype("float32")
    assert sum(isinstance(layer, RecomputedModule) for layer in loaded.layers) == 5
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
