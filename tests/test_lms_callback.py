"""The LMS callback on real models: same training with and without swapping, swaps live.

Every training test asserts that at least 10 swap nodes survive Grappler, so a callback that
swaps nothing fails. The CPU is split into /CPU:0 and /CPU:1 by tests/conftest.py.
"""

import json
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context

from lmstrain.lms import LMS, record_graphs, verify_swaps
from lmstrain.model.unet3d import isensee2017

HOST = "/CPU:1"


def branched_3d():
    """A small 3D network with parallel branches, a residual add and a skip concatenation."""
    inputs = keras.Input((8, 8, 8, 2))
    stem = layers.Conv3D(4, 3, padding="same", activation="relu")(inputs)
    left = layers.Conv3D(4, 1, activation="relu")(stem)
    right = layers.Conv3D(4, 3, padding="same", activation="relu")(stem)
    right = layers.Conv3D(4, 3, padding="same")(right)
    merged = layers.Add()([left, right])
    down = layers.MaxPooling3D(2)(merged)
    down = layers.Conv3D(8, 3, padding="same", activation="relu")(down)
    up = layers.UpSampling3D(2)(down)
    x = layers.Concatenate()([stem, merged, up])
    outputs = layers.Conv3D(1, 1, activation="sigmoid")(x)
    return keras.Model(inputs, outputs)


def small_2d():
    """A small 2D network with two branches and batch normalisation."""
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, padding="same")(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    branch = layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = layers.Add()([x, branch])
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(5, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs)


def mobilenet_v2():
    return keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                          classes=5)


def volumes(n, size, channels_in, channels_out, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, size, size, size, channels_in)).astype("float32")
    y = (rng.random((n, size, size, size, channels_out)) > 0.5).astype("float32")
    return x, y


def images(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, size, size, 3), dtype="float32"), rng.integers(0, 5, n)


def train(build, data, lms=None, loss="mse", compile_kwargs=None, **fit_kwargs):
    """Build with fixed seeds, fit, and return (history, weights, run metadata)."""
    keras.utils.set_random_seed(0)
    model = build()
    model.compile(keras.optimizers.Adam(1e-3), loss, **(compile_kwargs or {}))
    with record_graphs() as recorded:
        history = model.fit(*data, epochs=fit_kwargs.pop("epochs", 1), shuffle=False,
                            verbose=0, callbacks=[lms] if lms else [], **fit_kwargs)
    return history.history, model.get_weights(), recorded.run_metadata


def live_swap_nodes(lms, run_metadata):
    """Swap nodes found after Grappler in the executed traced function with the most."""
    return max(c.live_swap_nodes for c in verify_swaps(run_metadata, lms.plans))


def assert_same_training(build, data, lms_kwargs=None, **kwargs):
    history, weights, _ = train(build, data, **kwargs)
    lms = LMS(host_device=HOST, **(lms_kwargs or {}))
    history_lms, weights_lms, run_metadata = train(build, data, lms=lms, **kwargs)
    assert live_swap_nodes(lms, run_metadata) >= 10
    assert history_lms == history
    assert len(weights_lms) == len(weights)
    for before, after in zip(weights, weights_lms):
        np.testing.assert_array_equal(after, before)
    return lms, history


def test_isensee_unet_trains_identically_with_validation():
    data = volumes(6, 16, 4, 3)
    lms, history = assert_same_training(
        lambda: isensee2017((16, 16, 16), base_filters=4, depth=3), data, batch_size=2,
        epochs=2, validation_data=volumes(2, 16, 4, 3, seed=1))
    assert len(history["val_loss"]) == 2
    assert "Placeholder" in {s.producer_type for s in lms.plans[-1].swapped}  # the batch


def test_lean_instance_norm_trains_identically_with_its_outputs_swapped():
    """tf.custom_gradient returns InstanceNormalization's output through an IdentityN, which
    the backward pass reads (the activation's gradient): the plan swaps it like any view."""
    lms, _ = assert_same_training(
        lambda: isensee2017((16, 16, 16), base_filters=4, depth=3, norm="instance_lean"),
        volumes(4, 16, 4, 3), batch_size=2)
    assert "IdentityN" in {s.producer_type for s in lms.plans[-1].swapped}


@pytest.mark.parametrize("build, data, loss", [
    (branched_3d, volumes(4, 8, 2, 1), "binary_crossentropy"),
    pytest.param(mobilenet_v2, images(8, 32), "sparse_categorical_crossentropy",
                 marks=pytest.mark.slow),  # about 45 s; test_distribute trains a Keras application
], ids=["branched_3d", "keras_mobilenet_v2"])
def test_models_with_branches_train_identically(build, data, loss):
    assert_same_training(build, data, loss=loss, batch_size=4)


def test_steps_per_execution():
    lms, _ = assert_same_training(branched_3d, volumes(8, 8, 2, 1), batch_size=1,
                                  compile_kwargs={"steps_per_execution": 4})
    # Between logical CPUs the loop's Optional holds the batch all step: it is not swapped.
    assert "Placeholder" not in {s.producer_type for p in lms.plans for s in p.swapped}
    assert any("outside the step" in s.reason for s in lms.plans[-1].skipped)


@pytest.mark.parametrize("steps", [1, 4])
def test_the_simulator_treats_the_batch_as_the_callback_does(steps):
    from lmstrain.lms import SwapSettings
    from lmstrain.lms.sim.trace import batch_specs, trace_train_step

    lms = LMS(host_device=HOST)
    train(branched_3d, batched(volumes(8, 8, 2, 1), 1), lms=lms,
          compile_kwargs={"steps_per_execution": steps})
    keras.utils.set_random_seed(0)
    model = branched_3d()
    model.compile(keras.optimizers.Adam(1e-3), "mse", steps_per_execution=steps)
    simulated = trace_train_step(model, batch_specs([(1, 8, 8, 8, 2), (1, 8, 8, 8, 1)]),
                                 SwapSettings(), executor="cpu").plan

    def batch_swapped(plan):
        return "Placeholder" in {s.producer_type for s in plan.swapped}

    assert batch_swapped(lms.plans[-1]) == batch_swapped(simulated) == (steps == 1)
    assert len(simulated.swapped) == len(lms.plans[-1].swapped)


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_mixed_float16(mixed_float16):
    lms, _ = assert_same_training(small_2d, images(8, 16), loss="sparse_categorical_crossentropy",
                                  batch_size=4)
    assert {s.dtype for s in lms.plans[-1].swapped} >= {"float16"}


def test_process_wide_changes_are_undone_when_training_ends():
    from tensorflow.python.framework import auto_control_deps

    before = auto_control_deps.SKIPPED_ORDER_INSENSITIVE_STATEFUL_OPS
    lms = LMS(host_device=HOST, copy_mode="deepcopy")
    train(branched_3d, batched(volumes(2, 8, 2, 1), 2), lms=lms, compile_kwargs={
        "jit_compile": True})
    assert lms.plans and lms.plans[-1].swapped
    assert auto_control_deps.SKIPPED_ORDER_INSENSITIVE_STATEFUL_OPS == before
    assert "DeepCopy" not in before
    assert lms.model.jit_compile is True
    assert memory_optimization() == rewriter_config_pb2.RewriterConfig.DEFAULT_MEM_OPT


def memory_optimization():
    """The Grappler memory optimizer setting of this thread's function calls."""
    config = config_pb2.ConfigProto()
    config.ParseFromString(context.context().function_call_options.config_proto_serialized)
    return config.graph_options.rewrite_options.memory_optimization


def test_grappler_memory_optimizer_is_off_while_training():
    seen = []
    probe = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: seen.append(memory_optimization()))
    lms = LMS(host_device=HOST)
    model = branched_3d()
    model.compile(optimizer="adam", loss="mse")
    model.fit(*volumes(4, 8, 2, 1), batch_size=2, epochs=1, verbose=0, callbacks=[lms, probe])
    assert seen and set(seen) == {rewriter_config_pb2.RewriterConfig.NO_MEM_OPT}
    assert memory_optimization() == rewriter_config_pb2.RewriterConfig.DEFAULT_MEM_OPT


def test_compute_equal_to_host_leaves_graph_alone(caplog):
    lms = LMS(host_device="/CPU:0", compute_device="/job:localhost/replica:0/task:0/device:CPU:0")
    with caplog.at_level(logging.INFO, logger="lmstrain.lms"):
        for _ in range(2):
            history, _, run_metadata = train(branched_3d, volumes(2, 8, 2, 1), lms=lms)
    said = [r.message for r in caplog.records if "left unchanged" in r.message]
    assert said == ["LMS: compute device and host device are both /CPU:0; swapping would move "
                    "nothing, so the training step is left unchanged."]
    assert lms.plans == [] and not lms.active
    assert "lms/" not in str(run_metadata)


def test_xla_is_turned_off_while_swapping_and_restored(caplog):
    keras.utils.set_random_seed(0)
    model = branched_3d()
    model.compile("adam", "mse", jit_compile=True)
    lms = LMS(host_device=HOST)
    with caplog.at_level(logging.WARNING, logger="lmstrain.lms"):
        model.fit(*volumes(2, 8, 2, 1), verbose=0, callbacks=[lms])
    assert any("turning XLA off" in r.message for r in caplog.records)
    assert lms.plans and lms.plans[-1].swapped
    assert model.jit_compile is True
    assert "train_step" not in model.__dict__


def test_verify_logs_one_line_per_traced_function(caplog):
    lms = LMS(host_device=HOST, verify=True)
    with caplog.at_level(logging.INFO, logger="lmstrain.lms"):
        train(branched_3d, volumes(4, 8, 2, 1), lms=lms, batch_size=2)
    lines = [r.message for r in caplog.records if "after Grappler" in r.message]
    executed = [c for c in lms.checks if c.found]
    assert len(lines) == len(executed) >= 1
    assert all(c.ok for c in executed)
    assert len({(c.function, c.trace) for c in lms.checks}) == len(lms.plans)
    n = executed[0].swap_nodes
    assert f"{n}/{n} swap nodes live after Grappler" in lines[0]


def test_plan_report_is_json_with_swapped_and_skipped_tensors():
    lms = LMS(host_device=HOST, min_tensor_bytes=2048)
    train(branched_3d, volumes(2, 8, 2, 1), lms=lms)
    report = json.loads(json.dumps(lms.plan_report()))
    assert report["active"] and report["replicas"][0]["host_device"].endswith("CPU:1")
    plan = report["functions"][-1]
    swapped = plan["swapped"][0]
    assert swapped["bytes"] >= 2048 and swapped["producer"]
    assert swapped["swap_ins"][0]["consumers"] and swapped["swap_ins"][0]["trigger"]
    assert any("min_tensor_bytes" in s["reason"] for s in plan["skipped"])
    assert plan["totals"]["swapped_tensors"] == len(plan["swapped"])
    assert plan["totals"]["swapped_bytes"] == sum(s["bytes"] for s in plan["swapped"])


def test_unknown_batch_dimension_uses_the_given_batch_size(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("lmstrain"), "propagate", True)  # the CLI turns it off
    lms = LMS(host_device=HOST, batch_size=2)
    train(branched_3d, volumes(5, 8, 2, 1), lms=lms, batch_size=2)  # 2, 2, 1: shapes unknown
    plan = lms.plans[-1]
    assert (plan.batch_size, plan.batch_size_source) == (2, "LMS batch_size")
    relu = next(s for s in plan.swapped if s.shape[0] is None and s.shape[-1] == 4)
    assert relu.bytes == 2 * 8 * 8 * 8 * 4 * 4
    caplog.clear()
    unknown = LMS(host_device=HOST)
    train(branched_3d, volumes(5, 8, 2, 1), lms=unknown, batch_size=2)
    assert unknown.plans[-1].batch_size_source == "unknown (sizes per sample)"
    assert "Pass LMS(batch_size=N)" in caplog.text


def batched(data, batch_size):
    """A dataset of static-shape batches (the traced step then knows its batch size)."""
    return (tf.data.Dataset.from_tensor_slices(data).batch(batch_size, drop_remainder=True),)


def test_every_trace_is_rewritten():
    lms = LMS(host_device=HOST)
    train(branched_3d, batched(volumes(2, 8, 2, 1), 2), lms=lms)
    first = len(lms.plans)
    train(branched_3d, batched(volumes(4, 8, 2, 1), 4), lms=lms)
    assert first >= 1 and len(lms.plans) > first
    assert [p.trace for p in lms.plans] == list(range(1, len(lms.plans) + 1))
    assert all(p.swapped for p in lms.plans)
    assert {p.batch_size for p in lms.plans} == {2, 4}
