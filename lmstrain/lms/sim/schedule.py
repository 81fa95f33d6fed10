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
"""

from collections import deque

from lmstrain.lms.graph import BACKWARD, SWAP_SCOPE


def executor_order(flow, late_types=frozenset(), host_sends=False, reverse_gradients=False):
    """The nodes of ``flow`` in emulated execution order (each node's ``expensive`` flag says
    whether the executor may hand it to the thread pool).

    Nodes of ``late_types`` come after their siblings in every ready list, in reverse
    post-order among themselves: oneDNN's graph pass replaces them by new nodes, whose edges
    TensorFlow then lists last. With ``host_sends``, a ready host node (a swap-out on /CPU:1)
    is reached through a cheap ``_Send`` on the compute device's inline queue: when that send
    runs, the host partition's own executor hands the node to the shared pool, whose front it
    joins, so it runs as soon as the compute device's inline work is done. With
    ``reverse_gradients``, backward ops (not swap or recompute nodes, nor ``late_types``) swap
    their places among themselves in every ready list: the last created comes first.
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
    pool = deque(n.name for n in flow.nodes if not n.preds)
    order, sent = [], set()
    while pool:
        inline = deque([pool.popleft()])
        while inline:
            name = inline.popleft()
            if host_sends and flow.by_name[name].on_host and name not in sent:
                sent.add(name)  # its _Send ran: the host's executor queues it
                pool.appendleft(name)
                continue
            order.append(flow.by_name[name])
            ready = []
            for succ in successors[name]:
                pending[succ] -= 1
                if pending[succ] == 0:
                    ready.append(succ)
            handed_off, last = [], None
            for succ in ready:
                if host_sends and flow.by_name[succ].on_host:
                    inline.append(succ)
                    continue
                if not flow.by_name[succ].expensive:
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
