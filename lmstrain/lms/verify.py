"""Proof that swaps are live: find every planned swap node after Grappler and partitioning.

The placement log prints before Grappler runs, so it cannot show whether swap nodes survived.
The eager context's graph collection records, per executed function, the graph after
optimisation and its per-device partitions; node names there carry a prefix from function
inlining (``StatefulPartitionedCall/.../lms/...``), so names are matched by suffix.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field

from lmstrain.lms import _tf
from lmstrain.lms.devices import same


@dataclass
class SwapCheck:
    """How much of one plan survived optimisation."""

    function: str
    trace: int
    swap_nodes: int
    live_swap_nodes: int
    trigger_edges: int
    intact_trigger_edges: int
    found: bool
    missing: list = field(default_factory=list)
    replica: int | None = None
    # edges whose trigger Grappler removed (e.g. a division folded away), handing the swap-in's
    # wait to an op before it: the swap-in still waits, a little earlier than planned
    forwarded_trigger_edges: list = field(default_factory=list)
    # edges Grappler dropped as implied: the swap-in waits for the swap-out of the trigger's
    # output (``SwapIn.after_swap_outs``), which waits for the trigger
    implied_trigger_edges: list = field(default_factory=list)
    recompute_ops: int = 0
    live_recompute_ops: int = 0

    @property
    def ok(self):
        return (self.found and self.live_swap_nodes == self.swap_nodes
                and self.intact_trigger_edges + len(self.forwarded_trigger_edges)
                + len(self.implied_trigger_edges) == self.trigger_edges
                and self.live_recompute_ops == self.recompute_ops)

    def summary(self, plan):
        """E.g. ``LMS: 37 tensors swapped, 412.0 MiB/step, 81/81 swap nodes live after Grappler,
        44/44 trigger edges intact``."""
        head = (f"LMS: {plan.label}: {len(plan.swapped)} tensors swapped, "
                f"{plan.swapped_bytes / 2**20:.1f} MiB/step, ")
        if not self.found:
            return head + ("never executed, so not checked (e.g. the trace TensorFlow makes "
                           "while creating variables)")
        forwarded = (f" ({len(self.forwarded_trigger_edges)} forwarded to an earlier op: Grappler "
                     f"removed their trigger)" if self.forwarded_trigger_edges else "")
        implied = (f" ({len(self.implied_trigger_edges)} implied by a wait for the swap-out of "
                   f"the trigger's output)" if self.implied_trigger_edges else "")
        recomputed = (f", {self.live_recompute_ops}/{self.recompute_ops} recompute ops live"
                      if self.recompute_ops else "")
        return head + (f"{self.live_swap_nodes}/{self.swap_nodes} swap nodes live after Grappler, "
                       f"{self.intact_trigger_edges}/{self.trigger_edges} trigger edges intact"
                       f"{forwarded}{implied}{recomputed}")


class RecordedGraphs:
    """Holds the ``RunMetadata`` of :func:`record_graphs` once its block has ended."""

    run_metadata = None


@contextmanager
def record_graphs():
    """Record the graphs of the functions first executed inside the block.

    Example::

        with record_graphs() as recorded:
            model.fit(x, y, callbacks=[lms])
        checks = verify_swaps(recorded.run_metadata, lms.plans)
    """
    recorded = RecordedGraphs()
    _tf.start_graph_collection()
    try:
        yield recorded
    finally:
        recorded.run_metadata = _tf.collect_graphs()
        _tf.stop_graph_collection()


def verify_swaps(run_metadata, plans):
    """Check ``plans`` against the function graphs in ``run_metadata``; one SwapCheck per plan.

    A swap node is live when it is in the post-optimisation graph and in the partition of the
    device the plan put it on; a trigger edge is intact when the swap-in's partition still has
    the control input from the trigger; a recompute op is live when it is in the compute
    device's partition.
    """
    graphs = [_FunctionGraph(fg) for fg in run_metadata.function_graphs]
    return [_check(plan, graphs) for plan in plans]


class _FunctionGraph:
    """Nodes of one executed function, findable by any name suffix."""

    def __init__(self, function_graph):
        self.optimised = _by_suffix(function_graph.post_optimization_graph.node)
        self.partitions = _by_suffix(
            node for partition in function_graph.partition_graphs for node in partition.node)


def _by_suffix(nodes):
    """Map ``a/b/c`` and every shorter ``b/c``, ``c`` to the node (first node wins)."""
    index = {}
    for node in nodes:
        parts = node.name.split("/")
        for start in range(len(parts)):
            index.setdefault("/".join(parts[start:]), node)
    return index


def _check(plan, graphs):
    names = plan.swap_nodes
    edges = [(i.name, t) for s in plan.swapped for i in s.swap_ins for t in i.trigger]
    triggers = {i.name: i.trigger for i in plan.swap_ins}
    swap_outs = {s.tensor: s.swap_out for s in plan.swapped}
    through = {(i.name, t.rpartition(":")[0]): swap_outs[t] for i in plan.swap_ins
               for t in i.after_swap_outs}
    clones = list(dict.fromkeys(c for r in plan.recomputed for c in r.clones))
    check = SwapCheck(plan.function, plan.trace, len(names), 0, len(edges), 0, found=False,
                      replica=plan.replica, recompute_ops=len(clones))
    if not names:
        check.found = True
        return check
    graph = max(graphs, key=lambda g: sum(n in g.optimised for n in names), default=None)
    if graph is None or not any(n in graph.optimised for n in names):
        check.missing = list(names)
        return check
    check.found = True
    placement = {s.swap_out: plan.host_device for s in plan.swapped}
    placement.update({i.name: plan.compute_device for i in plan.swap_ins})
    for name in names:
        node = graph.partitions.get(name)
        if name in graph.optimised and node is not None and same(node.device, placement[name]):
            check.live_swap_nodes += 1
        else:
            check.missing.append(name)
    for swap_in, trigger in edges:
        node = graph.partitions.get(swap_in)
        controls = [i[1:] for i in node.input if i.startswith("^")] if node else []
        if any(c == trigger or c.endswith("/" + trigger) for c in controls):
            check.intact_trigger_edges += 1
        elif (swap_in, trigger) in through and _waits_for(graph.optimised.get(swap_in),
                                                          through[(swap_in, trigger)]):
            check.implied_trigger_edges.append(f"^{trigger} -> {swap_in}")
        elif trigger not in graph.optimised and any(
                not any(c == t or c.endswith("/" + t) for t in triggers[swap_in])
                for c in controls):  # a control input the plan did not make: the forwarded one
            check.forwarded_trigger_edges.append(f"^{trigger} -> {swap_in}")
        else:
            check.missing.append(f"^{trigger} -> {swap_in}")
    for name in clones:
        node = graph.partitions.get(name)
        if node is not None and same(node.device, plan.compute_device):
            check.live_recompute_ops += 1
        else:
            check.missing.append(name)
    return check


def _waits_for(node, name):
    """True if ``node`` (of the optimised graph) has a control input from op ``name``."""
    return node is not None and any(i[1:] == name or i[1:].endswith("/" + name)
                                    for i in node.input if i.startswith("^"))
