"""Swapping the step's inputs: the batch is freed after its swap-out, measured and simulated."""

import pytest
import tensorflow as tf

from lmstrain.config import load_config
from lmstrain.lms import SwapSettings
from lmstrain.lms.graph import StepGraph, step_inputs
from lmstrain.lms.plan import make_plan
from lmstrain.planning import harness
from lmstrain.planning.simulate import simulate_step

CPU0 = "/job:localhost/replica:0/task:0/device:CPU:0"
CPU1 = "/job:localhost/replica:0/task:0/device:CPU:1"
# The demo network's step arguments are named data (image) and data_1 (targets).
KEEP_INPUTS = {"exclude_scopes": ["data", "data_1"]}


def test_only_the_step_arguments_are_inputs_and_they_are_swapped():
    weight = tf.Variable(tf.ones((64, 64)))
    scale = tf.constant(2.0)

    @tf.function
    def train_step(x):
        with tf.GradientTape() as tape:
            h = tf.nn.relu(tf.matmul(x, weight) * scale, name="act")
            h = tf.nn.relu(tf.matmul(h, weight), name="act2")
            loss = tf.reduce_sum(tf.matmul(h, weight))
        weight.assign_sub(tape.gradient(loss, weight))
        return loss

    graph = train_step.get_concrete_function(tf.TensorSpec([32, 64], tf.float32)).graph
    assert [op.name for op in step_inputs(graph)] == ["x"]  # not the captured weight or scale
    step = StepGraph.analyse(graph, graph.outputs)
    plan = make_plan(step, SwapSettings(), CPU0, CPU1, "snapshot", function="step", trace=1,
                     batch_size_source="test")
    assert "x:0" in [s.tensor for s in plan.swapped]
    step = StepGraph.analyse(graph, graph.outputs, batch_owned=False)  # held outside
    plan = make_plan(step, SwapSettings(), CPU0, CPU1, "snapshot", function="step", trace=1,
                     batch_size_source="test")
    assert "x:0" not in [s.tensor for s in plan.swapped]
    assert "outside the step" in {s.tensor: s.reason for s in plan.skipped}["x:0"]


@pytest.mark.slow  # about 40 s of profiled training
def test_a_swapped_batch_is_freed_after_its_swap_out_and_the_peak_drops():
    config = load_config("configs/demo.yaml")
    shape, batch = (32, 32, 32), 2
    image, targets = batch * 32**3 * 4 * 4, batch * 32**3 * 3 * 4
    kept, swapped = (harness.run_trial(harness.request(config.to_dict(), shape, batch, swap=swap,
                                                       batches="fresh"))
                     for swap in (KEEP_INPUTS, {}))
    assert swapped["swapped_tensors"] == kept["swapped_tensors"] + 2

    def freed(run, size):
        buffer = next(b for b in run["input_buffers"] if b["bytes"] == size)
        return buffer["freed_ps"] / run["step_ps"]

    # Kept, the image waits for the first layer's filter gradient at the end of the step;
    # swapped, it is freed once the first layer and the swap-out have read it.
    assert freed(kept, image) > 0.9
    assert freed(swapped, image) < 0.1
    # The targets too: the loss's sum over them runs before the network, not after it.
    assert freed(swapped, targets) < 0.1
    # Measured (profiler replay, batch included): 10.2 MB swapped at 32^3, batch 2 (1.8 MB).
    drop = kept["step_peak_bytes"] - swapped["step_peak_bytes"]
    assert drop >= 0.8 * (image + targets)
    predicted = simulate_step(config, shape, batch, SwapSettings(), executor="cpu")
    assert abs(predicted.step_peak_bytes / swapped["step_peak_bytes"] - 1) <= 0.05
    assert "inputs" not in predicted.resident
