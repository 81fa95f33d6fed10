"""The order in which TensorFlow's executor runs a step's ops, emulated.

TensorFlow's executor (``ExecutorState::Process``/``ScheduleReady``) keeps a FIFO queue of
ops to run inline on the current thread. When an op finishes, its newly ready successors are
split: cheap kernels join the inline queue; of the "expensive" ones, the last runs inline when
the queue is empty and the others are handed to the inter-op thread pool. With one inter-op
thread the pool is a stack for work scheduled from its own thread (Eigen's run queue pushes
and pops at the front), and the initial ready ops (the roots) are queued behind it.

On a CPU nearly every kernel starts out "expensive" (its cost estimate starts at 10^8 cycles
and decays by 10% per run), so the step runs depth-first. GPU kernels are never "expensive":
everything runs from the inline FIFO queue, breadth-first. Successors are visited in creation
order; TensorFlow's own order follows the edges of the graph Grappler rebuilt, which the traced
graph does not tell. Measured on the paper's network with swapping and recomputation: each
instance norm's gradient reads its incoming gradient in two expensive ops, the input's gradient
(``mul_2/Mul_1``, freed at once by its sum) and the mean's (``add_2/Sum``, whose branch holds a
tiled gradient); with Grappler's arithmetic or dependency optimizer off, every block runs the
mean's branch first, the reverse of creation order; with both on (the default), all but one
run in creation order (the block whose input's swap-in waits for the swap-out of the gradient
it reads, at 64^3 and 96^3). ``reverse_gradients`` visits the gradient ops' successors among
themselves in reverse creation order, so a caller can take the worse of the two. The CPU
emulation is of the measurement setting (one inter-op thread) the simulator was validated in.

Between the compute device and the host (``host_sends``) the ops TensorFlow's partitioning adds
are emulated too, as measured in swapped steps' op orders and partition graphs (one inter-op
thread): a ``_Send`` is expensive, so an op's send to a swap-out runs inline only when nothing
else is ready; a partition lists it where it reaches the swap-out in the graph Grappler
returned, before the op's consumers Grappler put after the swap-out. A swap-out sends its copy
to the swap-ins in one ``_Send`` (expensive) and its control edges to each op that waits for it
through a host ``NoOp`` (cheap) and a ``_Send``; what a ``_Recv`` makes ready joins the pool's
front. So a swap-in's copy can sit in the pool beneath later work until the pass drains it,
and the swap-out of a decoder level whose upsampling starts with a cheap op waits until the
forward pass ends. The batch comes from the step's ``IteratorGetNext``, the last root to run:
the optimizer's and the dropouts' variable reads run first.
"""

from collections import deque

from lmstrain.lms.graph import BACKWARD, SWAP_SCOPE


def executor_order(flow, late_types=frozenset(), host_sends=False, reverse_gradients=False):
    """The nodes of ``flow`` in emulated execution order (each node's ``expensive`` flag says
    whether the executor may hand it to the thread pool).

    Nodes of ``late_types`` come after their siblings in every ready list, in reverse
    post-order among themselves: oneDNN's graph pass replaces them by new nodes, whose edges
    TensorFlow then lists last. With ``host_sends``, host nodes (swap-outs on /CPU:1) are
    reached, and reach the compute device, through the sends and receives partitioning adds
    (see the module docstring; ``flow.positions`` places the sends), and the batch's input
    nodes are the last roots. With ``reverse_gradients``, backward ops (not swap or recompute
    nodes, nor ``late_types``) swap their places among themselves in every ready list: the
    last created comes first.
    """
    position = {n.name: i for i, n in enumerate(flow.nodes)}
    if late_types:
        rpo = reverse_post_order(flow)
        late = len(flow.nodes)
        position = {n.name: late + rpo[n.name] if n.type in late_types else position[n.name]
                    for n in flow.nodes}
    if reverse_gradients:
        gradients = sorted((n.name for n in flow.nodes
                            if n.phase == BACKWARD and SWAP_SCOPE not in n.name
                            and n.type not in late_types),
                           key=position.__getitem__)
        position.update(zip(reversed(gradients), [position[name] for name in gradients]))
    pending = {n.name: len(n.preds) for n in flow.nodes}
    successors = {n.name: [] for n in flow.nodes}
    for node in flow.nodes:
        for pred in node.preds:
            successors[pred].append(node.name)
    for name in successors:
        successors[name].sort(key=position.__getitem__)
    cross = _CrossDevice(flow, successors, pending) if host_sends else None
    roots = [n for n in flow.nodes if not n.preds]
    if host_sends:  # the batch comes from the step's IteratorGetNext, the last root to run
        roots.sort(key=lambda n: n.type == "Placeholder")
    pool = deque(n.name for n in roots)
    order = []
    while pool:
        inline = deque([pool.popleft()])
        while inline:
            item = inline.popleft()
            if isinstance(item, tuple):
                ready = cross.run(item, pool)
            else:
                node = flow.by_name[item]
                order.append(node)
                if cross and node.on_host:
                    ready = cross.host_done(node)
                else:
                    ready = []
                    for succ in successors[item]:
                        if cross and flow.by_name[succ].on_host:
                            continue
                        pending[succ] -= 1
                        if pending[succ] == 0:
                            ready.append(succ)
                    if cross:
                        ready = cross.with_sends(item, ready)
            handed_off, last = [], None
            for succ in ready:
                if not _expensive(succ, flow):
                    inline.append(succ)
                    continue
                if last is not None:
                    handed_off.append(last)
                last = succ
            if last is not None:
                if inline:
                    handed_off.append(last)
                else:
                    inline.append(last)
            pool.extendleft(handed_off)
    if len(order) != len(flow.nodes):
        stuck = [n.name for n in flow.nodes if pending[n.name] > 0][:5]
        raise ValueError(f"the step's dependencies contain a cycle (e.g. at {stuck}); "
                         "cannot emulate an execution order")
    return order


def _expensive(item, flow):
    if isinstance(item, tuple):
        return item[0] != "group"  # the host's NoOp that groups control edges is cheap
    return flow.by_name[item].expensive


class _CrossDevice:
    """The ops TensorFlow's partitioning adds between the compute device and the host, as
    work items of the emulated executor: ``("send", host node)``, the compute device's
    ``_Send`` of a host node's input; ``("data", host node)``, the host's ``_Send`` of its
    output to the ops that read it; ``("group", op)``, the host's ``NoOp`` that collects the
    host nodes a compute-device op only waits for, and ``("control", op)``, its ``_Send``.
    A ``_Recv`` completes outside the executor's inline queue: what it makes ready goes to
    the front of the pool."""

    def __init__(self, flow, successors, pending):
        self.flow, self.successors, self.pending = flow, successors, pending
        self.readers, self.waits = {}, {}
        for node in flow.nodes:
            if not node.on_host:
                continue
            for succ in successors[node.name]:
                if any(flow.producer.get(t) is node for t in flow.by_name[succ].inputs):
                    self.readers.setdefault(node.name, []).append(succ)
                elif not flow.by_name[succ].on_host:
                    self.waits[succ] = self.waits.get(succ, 0) + 1
        self.group_pending = dict(self.waits)

    def with_sends(self, name, ready):
        """``ready``, the ops ``name`` made ready, with the compute device's ``_Send`` of
        ``name``'s output to each host successor where TensorFlow lists it: a partition adds
        the send where it reaches the host node in the graph Grappler returned, so it comes
        before the ready ops Grappler put after that node (after all of them when the order
        is unknown: swap nodes are created after the step's ops)."""
        positions = self.flow.positions
        for host in self.successors[name]:
            if not self.flow.by_name[host].on_host:
                continue
            at = positions.get(host)
            later = [i for i, op in enumerate(ready) if isinstance(op, str) and at is not None
                     and positions.get(op, -1) > at]
            ready.insert(later[0] if later else len(ready), ("send", host))
        return ready

    def host_done(self, node):
        """What host node ``node`` makes ready: its data ``_Send``, then the ``NoOp`` of each
        compute-device op whose last host node it was, and host nodes that wait for it."""
        ready = [("data", node.name)] if node.name in self.readers else []
        for succ in self.successors[node.name]:
            if self.flow.by_name[succ].on_host:
                self.pending[succ] -= 1
                if self.pending[succ] == 0:
                    ready.append(succ)
            elif succ in self.group_pending and succ not in self.readers.get(node.name, ()):
                self.group_pending[succ] -= 1
                if self.group_pending[succ] == 0:
                    ready.append(("group", succ))
        return ready

    def run(self, item, pool):
        """Run a send or ``NoOp`` ``item``: what its ``_Recv`` makes ready joins ``pool``'s
        front; returns what it makes ready itself (a ``NoOp``'s ``_Send``)."""
        kind, name = item
        if kind == "group":
            return [("control", name)]
        if kind == "send":
            received, count = [name], 1
        elif kind == "data":
            received, count = self.readers[name], 1
        else:
            received, count = [name], self.waits[name]
        for succ in received:
            self.pending[succ] -= count
            if self.pending[succ] == 0:
                pool.appendleft(succ)
        return []


def reverse_post_order(flow):
    """Node name -> index in a reverse post-order (depth-first from the roots, children and
    roots in creation order), as TensorFlow's ``GetReversePostOrder``."""
    children = {n.name: [] for n in flow.nodes}
    for node in flow.nodes:
        for pred in node.preds:
            children[pred].append(node.name)
    seen, post = set(), []
    for root in (n.name for n in flow.nodes if not n.preds):
        if root in seen:
            continue
        seen.add(root)
        stack = [(root, iter(children[root]))]
        while stack:
            name, rest = stack[-1]
            for child in rest:
                if child not in seen:
                    seen.add(child)
                    stack.append((child, iter(children[child])))
                    break
            else:
                stack.pop()
                post.append(name)
    return {name: i for i, name in enumerate(reversed(post))}
