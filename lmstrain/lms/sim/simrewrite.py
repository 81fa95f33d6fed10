"""Edits of a :class:`~lmstrain.lms.sim.dataflow.Dataflow` that mirror graph rewrites.

- :func:`with_plan` adds a swap plan's nodes and edges (and its recomputations' repeated ops)
  exactly as :func:`lmstrain.lms.rewrite.apply_plan` adds them to the traced graph, so
  auto-tune can try many plans on one trace (a swapped step input stops being resident, as
  :func:`lmstrain.lms.sim.dataflow.build` does for a rewritten trace);
- :func:`accumulate_addn` mirrors Grappler's memory optimizer, which turns large ``AddN`` ops
  into running sums when the device is nearly full.
"""

import copy

from lmstrain.lms.sim.dataflow import Node, Output, release_input
from lmstrain.lms.rewrite import swap_scope

COPY_TYPES = {"snapshot": "Snapshot", "deepcopy": "DeepCopy"}


def with_plan(flow, plan, cpu_executor=True):
    """A copy of ``flow`` with the swap-outs, swap-ins and control edges of ``plan``."""
    nodes = [copy.copy(n) for n in flow.nodes]
    for node in nodes:
        node.inputs, node.preds = list(node.inputs), list(node.preds)
    result = flow.derived(nodes)
    released = {t: release_input(result, t) for t in
                dict.fromkeys(flow.tensor(s.tensor) for s in plan.swapped)
                if t in result.inputs}
    by_name = {n.name: n for n in result.nodes}
    kind = COPY_TYPES[plan.copy_mode]
    added = []
    swapped_in = {}  # (tensor, swap-in index) -> the swap-in node's output
    for swapped in plan.swapped:
        tensor = flow.tensor(swapped.tensor)
        producer = released.get(tensor) or flow.producer.get(tensor)
        if producer is None:
            continue  # folded or pruned: the rewrite's copy is never executed either
        size = next(o for o in producer.outputs if o.name == tensor)
        scope = swap_scope(plan.trace, swapped.tensor)
        out = Node(f"{scope}swap_out", kind, producer.phase, True, [tensor], [producer.name],
                   expensive=cpu_executor)
        out.outputs.append(Output(f"{out.name}:0", size.bytes, size.elements, size.dtype))
        added.append(out)
        for index, swap_in in enumerate(swapped.swap_ins):
            back = Node(f"{scope}swap_in_{index}", kind, "backward", False, [out.outputs[0].name],
                        [out.name] + _names(flow, swap_in.trigger), expensive=cpu_executor)
            back.outputs.append(Output(f"{back.name}:0", size.bytes, size.elements, size.dtype))
            added.append(back)
            swapped_in[(swapped.tensor, index)] = back.outputs[0].name
            for name in _names(flow, swap_in.consumers):
                consumer = by_name[name]
                consumer.inputs = [back.outputs[0].name if t == tensor else t
                                   for t in consumer.inputs]
                consumer.preds.append(back.name)
            for first, then in swap_in.frees_before:
                for waiting in _names(flow, [then]):
                    by_name[waiting].preds.extend(_names(flow, [first]))
        for name in _names(flow, swapped.wait_for_swap_out):
            by_name[name].preds.append(out.name)
    nodes = {n.name: n for n in added}
    for swapped in plan.swapped:
        for index, swap_in in enumerate(swapped.swap_ins):
            back = nodes.get(swap_scope(plan.trace, swapped.tensor) + f"swap_in_{index}")
            outs = [swap_scope(plan.trace, t) + "swap_out" for t in swap_in.after_swap_outs]
            if back is not None:
                back.preds.extend(name for name in outs if name in nodes)
    added.extend(_recomputations(flow, plan, swapped_in, by_name))
    for first, then in plan.orderings + plan.updates_first:
        for waiting in _names(flow, [then]):
            by_name[waiting].preds.extend(_names(flow, [first]))
    for node in result.nodes:
        node.preds = list(dict.fromkeys(node.preds))
    result.nodes.extend(added)
    result.index()
    return result


def _recomputations(flow, plan, swapped_in, by_name):
    """The repeated ops of ``plan``'s recomputations, as the rewrite makes them; rewires their
    consumers in ``by_name``."""
    added = []
    producer = {t: t.rpartition(":")[0] for t in swapped_in.values()}  # added nodes' outputs
    for r in plan.recomputed:
        replaced = {flow.tensor(source): swapped_in[(source, index)]
                    for source, index in r.sources if (source, index) in swapped_in}
        scope = swap_scope(plan.trace, r.tensor) + "recompute/"
        for name in r.ops:
            node = flow.node(name)
            if node is None:
                continue  # folded or deduplicated away
            inputs = [replaced.get(t, t) for t in node.inputs]
            clone = copy.copy(node)
            clone.name = scope + node.name.rpartition("/")[2]
            clone.phase, clone.inputs = "backward", inputs
            clone.preds = list(dict.fromkeys(
                [producer.get(t) or flow.producer[t].name for t in inputs
                 if t in producer or t in flow.producer] + _names(flow, r.trigger)))
            clone.outputs = [Output(f"{clone.name}:{i}", o.bytes, o.elements, o.dtype)
                             for i, o in enumerate(node.outputs)]
            producer.update((o.name, clone.name) for o in clone.outputs)
            added.append(clone)
            replaced.update((o.name, c.name) for o, c in zip(node.outputs, clone.outputs))
        tensor = flow.tensor(r.tensor)
        if tensor not in replaced:
            continue
        for name in _names(flow, r.consumers):
            consumer = by_name[name]
            consumer.inputs = [replaced[tensor] if t == tensor else t for t in consumer.inputs]
            consumer.preds.append(producer[replaced[tensor]])
        for first, then in r.frees_before:
            for waiting in _names(flow, [then]):
                by_name[waiting].preds.extend(_names(flow, [first]))
    return added


def _names(flow, op_names):
    """Node names of ``op_names`` that run (deduplicated ops map to the node they became)."""
    nodes = [flow.node(name) for name in op_names]
    return list(dict.fromkeys(n.name for n in nodes if n is not None))


def addn_candidates(flow):
    """AddN nodes with more than two inputs (the targets of Grappler's rewrite)."""
    return [n for n in flow.nodes if n.type == "AddN" and len(n.inputs) > 2]


def accumulate_addn(flow, names):
    """A copy of ``flow`` with the AddN nodes ``names`` as running sums.

    Grappler (``memory_optimizer.cc``, ``SchedulingPass``) rewrites an AddN with more than two
    inputs into a temporary variable initialised after its earliest input and one
    ``AssignAdd`` per input, so that each input can be freed as soon as it is added, when its
    own memory estimate exceeds 80% of the device's memory. Here: an init node after the
    earliest producer allocates the sum; one node per input adds to it; the AddN's output is a
    view of the sum.
    """
    position = {n.name: i for i, n in enumerate(flow.nodes)}
    nodes = []
    for node in flow.nodes:
        if node.name not in names:
            nodes.append(node)
            continue
        producers = [flow.producer[t].name for t in node.inputs]
        first = min(node.inputs, key=lambda t: position[flow.producer[t].name])
        out = node.outputs[0]
        total = f"{node.name}/tmp_var:0"
        init = Node(f"{node.name}/tmp_var_initializer", "Assign", node.phase, node.on_host,
                    [first], [flow.producer[first].name], expensive=node.expensive)
        init.outputs.append(Output(total, out.bytes, out.elements, out.dtype))
        adds = [Node(f"{node.name}/tmp_var_accum_{i}", "AssignAdd", node.phase, node.on_host,
                     [total, t], [init.name, flow.producer[t].name], expensive=node.expensive)
                for i, t in enumerate(node.inputs)]
        others = [p for p in node.preds if p not in producers]
        done = Node(node.name, "DestroyTemporaryVariable", node.phase, node.on_host, [total],
                    [a.name for a in adds] + others, expensive=node.expensive)
        done.outputs.append(Output(out.name, out.bytes, out.elements, out.dtype, alias_of=total))
        nodes.extend([init, *adds, done])
    return flow.derived(nodes)
