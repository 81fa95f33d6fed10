"""Apply a swap plan to the traced graph: swap nodes, rewired consumers, control edges.

For each swapped tensor: a swap-out copy on the host device and one swap-in copy per consumer
group on the compute device, under the absolute name scope ``<producer>/lms/t<trace>_<i>/``. The
grouped consumers read the swap-in instead of the original; the swap-in waits for its
trigger ops; in ``swapout`` sync mode the producer's forward consumers wait for the swap-out so
the original can be freed as soon as the forward pass is done with it; the ops a swap-in
``frees_before`` wait for its consumers, so the copy is freed before they allocate.
"""

from collections import deque

import tensorflow as tf

from lmstrain.errors import RunError
from lmstrain.lms import tfgraph
from lmstrain.lms.graph import predecessors

COPY_OPS = {
    # Snapshot survives Grappler (an Identity pair across devices is removed).
    "snapshot": lambda t, name: tf.raw_ops.Snapshot(input=t, name=name),
    # DeepCopy always allocates, so swaps between logical CPUs really copy (measurement mode).
    "deepcopy": lambda t, name: tf.raw_ops.DeepCopy(x=t, name=name),
}


class SwapCycleError(RunError):
    """Applying the swap plan would make the traced step wait for itself."""


def apply_plan(step, plan):
    """Edit ``step.graph`` in place as ``plan`` says; fills in the swap node names."""
    check_acyclic(step, plan)
    if plan.copy_mode == "deepcopy":
        tfgraph.ignore_in_auto_control_deps("DeepCopy")
    copy = COPY_OPS[plan.copy_mode]
    graph = step.graph
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
                    for name in swap_in.trigger:
                        tfgraph.add_control_input(device_copy.op, graph.get_operation_by_name(name))
                    for name in swap_in.consumers:
                        _rewire(graph.get_operation_by_name(name), tensor, device_copy)
                    for first, then in swap_in.frees_before:
                        tfgraph.add_control_input(graph.get_operation_by_name(then),
                                                  graph.get_operation_by_name(first))
            for name in swapped.wait_for_swap_out:
                tfgraph.add_control_input(graph.get_operation_by_name(name), host_copy.op)


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
            tfgraph.replace_input(consumer, index, new)


def check_acyclic(step, plan):
    """Raise :class:`SwapCycleError` if the graph with the plan's edges would have a cycle."""
    cycle = find_cycle(step, plan)
    if cycle:
        raise SwapCycleError(
            f"LMS refused to rewrite {plan.function} (trace {plan.trace}): the swap plan would "
            f"create a cycle: {' -> '.join(cycle)}. Change swapin_ahead, swapin_groupby or "
            f"sync_mode, or exclude these ops with exclude_scopes.")


def find_cycle(step, plan):
    """A cycle (names, first repeated last) the plan's edges would create, or None."""
    successors = {op.name: set() for op in step.ops}
    for op in step.ops:
        for pred in predecessors(op):
            successors.setdefault(pred.name, set()).add(op.name)

    def edge(a, b):
        successors.setdefault(a, set()).add(b)
        successors.setdefault(b, set())

    for s in plan.swapped:
        out = f"<swap-out of {s.tensor}>"
        edge(s.producer, out)
        for name in s.wait_for_swap_out:
            edge(out, name)
        for index, swap_in in enumerate(s.swap_ins):
            back = f"<swap-in {index} of {s.tensor}>"
            edge(out, back)
            for name in swap_in.trigger:
                edge(name, back)
            for name in swap_in.consumers:
                edge(back, name)
            for first, then in swap_in.frees_before:
                edge(first, then)
    return _find_cycle(successors)


def _find_cycle(successors):
    """One cycle as a list of names (first name repeated at the end), or None."""
    indegree = {n: 0 for n in successors}
    for targets in successors.values():
        for t in targets:
            indegree[t] += 1
    queue = deque(n for n, d in indegree.items() if d == 0)
    while queue:
        for t in successors[queue.popleft()]:
            indegree[t] -= 1
            if indegree[t] == 0:
                queue.append(t)
    stuck = {n for n, d in indegree.items() if d > 0}
    if not stuck:
        return None
    # Every stuck node has a stuck predecessor; walk backwards until a node repeats.
    preds = {n: [] for n in stuck}
    for n in stuck:
        for t in successors[n]:
            if t in stuck:
                preds[t].append(n)
    path, seen = [min(stuck)], {}
    while path[-1] not in seen:
        seen[path[-1]] = len(path) - 1
        path.append(min(preds[path[-1]]))
    loop = path[seen[path[-1]]:]
    return list(reversed(loop))
