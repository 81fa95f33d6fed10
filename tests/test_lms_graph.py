"""Graph analysis and planning on a real traced training step (three dense layers)."""

import pytest
import tensorflow as tf

from lmstrain.lms import SwapCycleError, SwapSettings
from lmstrain.lms.graph import BACKWARD, FORWARD, UPDATE, StepGraph, tensor_bytes
from lmstrain.lms.plan import make_plan
from lmstrain.lms.rewrite import check_acyclic

CPU0 = "/job:localhost/replica:0/task:0/device:CPU:0"
CPU1 = "/job:localhost/replica:0/task:0/device:CPU:1"
BATCH = 8


@pytest.fixture(scope="module")
def step():
    """x[None, 64] -> dense 256 -> relu (act1) -> dense 256 -> relu (act2) -> dense 8 -> loss."""
    weights = [tf.Variable(tf.random.normal(shape, seed=i))
               for i, shape in enumerate([(64, 256), (256, 256), (256, 8)])]

    @tf.function
    def train_step(x):
        with tf.GradientTape() as tape:
            h = tf.nn.relu(tf.matmul(x, weights[0]), name="act1")
            h = tf.nn.relu(tf.matmul(h, weights[1]), name="act2")
            loss = tf.reduce_mean(tf.square(tf.matmul(h, weights[2])))
        for w, g in zip(weights, tape.gradient(loss, weights)):
            w.assign_sub(0.1 * g)
        return loss

    graph = train_step.get_concrete_function(tf.TensorSpec([None, 64], tf.float32)).graph
    return StepGraph.analyse(graph, graph.outputs, batch_size=BATCH)


def plan(step, **settings):
    return make_plan(step, SwapSettings(**settings), CPU0, CPU1, "snapshot", function="step",
                     trace=1, batch_size_source="test")


def op(step, name):
    return step.graph.get_operation_by_name(name)


def test_phases_follow_the_gradient_tape_scope(step):
    assert step.phase[op(step, "act1")] == FORWARD
    assert step.phase[op(step, "gradient_tape/ReluGrad")] == BACKWARD
    assert step.phase[op(step, "AssignSubVariableOp")] == UPDATE


def test_levels_are_longest_paths_over_data_and_control_edges(step):
    assert step.level[op(step, "x")] == 0
    assert step.level[op(step, "act1")] == step.level[op(step, "MatMul")] + 1
    relu_grad = op(step, "gradient_tape/ReluGrad_1")
    assert step.level[relu_grad] > max(step.level[p] for p in
                                       [t.op for t in relu_grad.inputs])
    update = op(step, "AssignSubVariableOp")  # waits for its read through a control edge
    assert step.level[update] > step.level[op(step, "MatMul/ReadVariableOp")]


def test_unknown_batch_dimension_counts_as_the_batch_size(step):
    assert step.tensor_bytes(op(step, "act1").outputs[0]) == BATCH * 256 * 4
    with tf.Graph().as_default():
        unknown = tf.compat.v1.placeholder(tf.float32, [None, None, 3])
        assert tensor_bytes(unknown, batch_size=5) is None


def test_activations_read_by_the_backward_pass_are_swapped(step):
    result = plan(step)
    swapped = {s.tensor: s for s in result.swapped}
    assert set(swapped) >= {"act1:0", "act2:0"}
    act1 = swapped["act1:0"]
    assert act1.bytes == BATCH * 256 * 4
    consumers = [c for swap_in in act1.swap_ins for c in swap_in.consumers]
    assert "gradient_tape/ReluGrad_1" in consumers
    for swap_in in act1.swap_ins:
        assert swap_in.trigger and all(step.phase[op(step, t)] == BACKWARD
                                       for t in swap_in.trigger)
    assert act1.wait_for_swap_out == ["MatMul_1/ReadVariableOp"]
    skipped = {s.tensor: s.reason for s in result.skipped}
    assert "ReadVariableOp output" in skipped["MatMul_1/ReadVariableOp:0"]


def test_plans_are_deterministic(step):
    assert plan(step).to_dict() == plan(step).to_dict()


@pytest.mark.parametrize("settings, reason", [
    ({"min_tensor_bytes": 10**6}, "bytes < min_tensor_bytes 1000000"),
    ({"swapout_threshold": 10**4}, "within swapout_threshold=10000 levels"),
    ({"exclude_types": ["Relu"]}, "op type Relu in exclude_types"),
    ({"include_scopes": ["gradient_tape"]}, "name not in include_scopes"),
])
def test_filters_skip_tensors_with_a_reason(step, settings, reason):
    result = plan(step, **settings)
    assert "act1:0" not in [s.tensor for s in result.swapped]
    assert reason in {s.tensor: s.reason for s in result.skipped}["act1:0"]


def test_unmatched_include_filters_are_noted(step):
    result = plan(step, include_types=["Conv3D"])
    assert result.swapped == []
    assert result.notes == ["include_types ['Conv3D'] match no forward op of this step"]


def test_groupby_merges_swap_ins_and_sync_swapin_waits_for_the_consumer_inputs(step):
    merged = {s.tensor: s for s in plan(step, swapin_groupby=10**4).swapped}
    assert all(len(s.swap_ins) == 1 for s in merged.values())
    late = {s.tensor: s for s in plan(step, sync_mode="swapin").swapped}["act1:0"]
    for swap_in in late.swap_ins:
        consumer = op(step, swap_in.consumers[0])
        assert set(swap_in.trigger) <= {t.op.name for t in consumer.inputs}


def test_a_plan_that_would_create_a_cycle_is_refused(step):
    result = plan(step)
    act1 = next(s for s in result.swapped if s.tensor == "act1:0")
    consumer = op(step, act1.swap_ins[0].consumers[0])
    later = consumer.outputs[0].consumers()[0]
    act1.swap_ins[0].trigger = [later.name]  # the swap-in would wait for its own consumer
    with pytest.raises(SwapCycleError, match="the swap plan would create a cycle: ") as error:
        check_acyclic(step, result)
    assert (f"<swap-in 0 of act1:0> -> {consumer.name} -> {later.name} -> "
            f"<swap-in 0 of act1:0>") in str(error.value)
