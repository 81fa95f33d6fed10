"""The planner's ordering rules on the demo network's traced step: small readers of a large
tensor run first, swap-outs are waited for where the pass would otherwise go on, and each
weight is updated as soon as the backward pass is done with it."""

import pytest

from lmstrain.config import load_config
from lmstrain.lms import SwapSettings
from lmstrain.lms.graph import BACKWARD, StepGraph
from lmstrain.planning.simulate import trace_step

NET = "isensee2017_1/"
GRAD = "gradient_tape/" + NET


@pytest.fixture(scope="module")
def trace():
    return trace_step(load_config("configs/demo.yaml"), (16, 16, 16), 1, SwapSettings())


def waits(trace, then, first):
    """True if ``then`` waits for ``first`` in the rewritten graph."""
    op = trace.graph.get_operation_by_name(then)
    return first in [c.name for c in op.control_inputs]


def test_the_skip_part_of_a_concatenation_gradient_is_sliced_first(trace):
    # Without the edge the executor slices the skip part when the backward pass reaches the
    # encoder, holding the whole concatenation gradient until then.
    slice_skip = GRAD + "dec0_concat_1/Slice"
    up_chain = GRAD + "dec0_up_act_1/LeakyRelu/LeakyReluGrad"
    assert [slice_skip, up_chain] in trace.plan.orderings
    assert waits(trace, up_chain, slice_skip)


def test_the_loss_sum_over_the_targets_runs_before_the_network(trace):
    targets = next(s for s in trace.plan.swapped if s.tensor == "data_1:0")
    first_read = NET + "enc0_in_conv_1/convolution/ReadVariableOp"
    assert first_read in targets.wait_for_swap_out
    assert ["compile_loss/dice_loss/Sum_1", first_read] in trace.plan.orderings
    assert waits(trace, first_read, "compile_loss/dice_loss/Sum_1")


def test_long_lived_gradients_are_on_the_host_before_their_near_readers_run(trace):
    graph = trace.graph
    step = StepGraph.analyse(graph, trace.outputs, trace.batch)
    gradients = [s for s in trace.plan.swapped if s.kept_consumers
                 and step.phase[graph.get_operation_by_name(s.producer)] == BACKWARD]
    assert gradients
    for swapped in gradients:
        assert set(swapped.wait_for_swap_out) & set(swapped.kept_consumers), swapped.tensor
        for name in swapped.wait_for_swap_out:
            assert swapped.swap_out in [c.name for c in graph.get_operation_by_name(name)
                                        .control_inputs]


def test_each_weight_is_updated_between_its_backward_read_and_the_ops_after_it(trace):
    # Without these edges TensorFlow's CPU executor leaves the optimizer's updates on its
    # thread pool's stack until the backward pass ends, holding every weight's gradient.
    graph = trace.graph
    handle = graph.get_operation_by_name(NET + "dec0_loc2_conv_1/convolution/ReadVariableOp")
    write = next(c for c in handle.inputs[0].consumers() if c.type == "AssignSubVariableOp")
    input_gradient = GRAD + "dec0_loc2_conv_1/convolution/Conv3DBackpropInputV2"
    after = GRAD + "dec0_loc1_act_1/LeakyRelu/LeakyReluGrad"
    assert [input_gradient, write.name] in trace.plan.updates_first
    assert [write.name, after] in trace.plan.updates_first
    assert waits(trace, write.name, input_gradient)  # so the kernel is written in place
    assert waits(trace, after, write.name)
    # The optimizer reads each gradient itself, not the IdentityN that gathers them all.
    [gathering] = trace.plan.bypassed
    assert graph.get_operation_by_name(gathering).type == "IdentityN"
    gradient = graph.get_tensor_by_name(
        GRAD + "dec0_loc2_conv_1/convolution/Conv3DBackpropFilterV2:0")
    assert {c.type for c in gradient.consumers()} >= {"Sub", "Square"}


def test_update_order_tensorflow_leaves_the_updates_where_they_were():
    trace = trace_step(load_config("configs/demo.yaml"), (16, 16, 16), 1,
                       SwapSettings(update_order="tensorflow"))
    assert trace.plan.swapped
    assert not trace.plan.updates_first and not trace.plan.bypassed
    assert not any(c.type == "AssignSubVariableOp"
                   for op in trace.graph.get_operations() for c in op.control_inputs
                   if op.name.startswith(GRAD))
