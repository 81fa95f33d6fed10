"""Apply a swap plan to the traced graph: swap nodes, rewired consumers, control edges.

For each swapped tensor: a swap-out copy on the host device and one swap-in copy per consumer
group on the compute device, under the absolute name scope ``<producer>/lms/t<trace>_<i>/``. The
grouped consumers read the swap-in instead of the original; the swap-in waits for its
trigger ops and the swap-outs it is ``after_swap_outs``; in ``swapout`` sync mode the producer's
forward consumers wait for the swap-out so the original can be freed as soon as the forward pass
is done with it; the ops a swap-in ``frees_before`` wait for its consumers, so the copy is freed
before they allocate; the second op of each of the plan's ``orderings`` and
``updates_first`` pairs waits for the first. The consumers of a ``bypassed`` ``IdentityN``
read its inputs.
Each recomputation repeats its ops on the compute device under
``<producer>/lms/t<trace>_<i>/recompute/``, reading the sources' swap-ins, and its consumers
read the repeated tensor.
"""

import tensorflow as tf

from lmstrain.lms import _tf
from lmstrain.lms.graph import StepGraph
from lmstrain.lms.plan import SwapPlan, check_acyclic

COPY_OPS = {
    # Snapshot survives Grappler (an Identity pair across devices is removed).
    "snapshot": lambda t, name: tf.raw_ops.Snapshot(input=t, name=name),
    # DeepCopy always allocates, so swaps between logical CPUs really copy (measurement mode).
    "deepcopy": lambda t, name: tf.raw_ops.DeepCopy(x=t, name=name),
}


def apply_plan(step: StepGraph, plan: SwapPlan) -> None:
    """Edit ``step.graph`` in place as ``plan`` says; fills in the swap node names.

    With ``copy_mode="deepcopy"`` the trace must be finalised inside
    :func:`lmstrain.lms._tf.order_insensitive` ``("DeepCopy")``.
    """
    check_acyclic(step, plan)
    copy = COPY_OPS[plan.copy_mode]
    graph = step.graph
    for name in plan.bypassed:
        barrier = graph.get_operation_by_name(name)
        for old, new in zip(barrier.outputs, barrier.inputs):
            for consumer in dict.fromkeys(old.consumers()):
                _rewire(consumer, old, new)
    swapped_in = {}  # (tensor, swap-in index) -> the swap-in's output
    with graph.control_dependencies(None):
        for swapped in plan.swapped:
            tensor = graph.get_tensor_by_name(swapped.tensor)
            with graph.name_scope(swap_scope(plan.trace, swapped.tensor)):
                with graph.device(plan.host_device):
                    host_copy = copy(tensor, "swap_out")
                swapped.swap_out = host_copy.op.name
                for index, swap_in in enumerate(swapped.swap_ins):
                    with graph.device(plan.compute_device):
                        device_copy = copy(host_copy, f"swap_in_{index}")
                    swap_in.name = device_copy.op.name
                    swapped_in[(swapped.tensor, index)] = device_copy
                    for name in swap_in.trigger:
                        _tf.add_control_input(device_copy.op, graph.get_operation_by_name(name))
                    for name in swap_in.consumers:
                        _rewire(graph.get_operation_by_name(name), tensor, device_copy)
                    for first, then in swap_in.frees_before:
                        _tf.add_control_input(graph.get_operation_by_name(then),
                                                  graph.get_operation_by_name(first))
            for name in swapped.wait_for_swap_out:
                _tf.add_control_input(graph.get_operation_by_name(name), host_copy.op)
        swap_outs = {s.tensor: graph.get_operation_by_name(s.swap_out) for s in plan.swapped}
        for swap_in in plan.swap_ins:
            for tensor in swap_in.after_swap_outs:
                _tf.add_control_input(graph.get_operation_by_name(swap_in.name),
                                      swap_outs[tensor])
        _recompute(graph, plan, swapped_in)
        for first, then in plan.orderings + plan.updates_first:
            _tf.add_control_input(graph.get_operation_by_name(then),
                                  graph.get_operation_by_name(first))


def _recompute(graph, plan, swapped_in):
    """Repeat each recomputation's ops after its trigger, reading its sources' swap-ins."""
    for r in plan.recomputed:
        replaced = {source: swapped_in[(source, index)] for source, index in r.sources}
        triggers = [graph.get_operation_by_name(name) for name in r.trigger]
        with graph.name_scope(swap_scope(plan.trace, r.tensor) + "recompute/"), \
                graph.device(plan.compute_device):
            for name in r.ops:
                op = graph.get_operation_by_name(name)
                clone = _tf.clone_op(op, [replaced.get(t.name, t) for t in op.inputs],
                                     name.rpartition("/")[2])
                for trigger in triggers:
                    _tf.add_control_input(clone, trigger)
                replaced.update((old.name, new) for old, new in zip(op.outputs, clone.outputs))
                r.clones.append(clone.name)
        original = graph.get_tensor_by_name(r.tensor)
        for name in r.consumers:
            _rewire(graph.get_operation_by_name(name), original, replaced[r.tensor])
        for first, then in r.frees_before:
            _tf.add_control_input(graph.get_operation_by_name(then),
                                  graph.get_operation_by_name(first))


def swap_scope(trace, tensor_name):
    """``functional_1/conv3d_1/Relu/lms/t2_0/`` for tensor ``functional_1/conv3d_1/Relu:0``.

    Under the producer's name, so a swap-in sorts where the tensor it replaces sorted: Grappler
    orders the inputs of an ``AddN`` by name, and a different order would change the sum's
    rounding.
    """
    op_name, _, index = tensor_name.rpartition(":")
    return f"{op_name}/lms/t{trace}_{index}/"


def _rewire(consumer, old, new):
    for index, tensor in enumerate(consumer.inputs):
        if tensor.name == old.name:
            _tf.replace_input(consumer, index, new)
