"""Replay an execution order and track which buffers are live on the device and the host.

Rules (TensorFlow's, as far as they decide memory):

- an op's outputs are allocated when it starts and its inputs are released when it ends, so
  while it runs both are live;
- a buffer is freed when the last reader of it, or of any alias of it, has run (TensorFlow
  counts references per input slot; an op reading a tensor twice holds two);
- an element-wise op writes into an input buffer of the same size and type when it holds the
  only remaining reference to it (``forward_input_or_allocate_output``);
- weights, optimizer state, constants and the step's inputs are resident throughout
  (``Dataflow.resident``) and never forwarded;
- outputs nothing reads are freed as soon as their op ends.
"""

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class LiveTensor:
    tensor: str
    producer: str
    op_type: str
    phase: str
    bytes: int


@dataclass
class Timeline:
    """Peak of the step's own buffers (resident bytes excluded) on the device and the host."""

    peak_bytes: int
    peak_index: int
    peak_node: str
    live: list  # LiveTensor on the device at the peak
    host_peak_bytes: int
    working_bytes: int  # the largest sum of one node's device inputs and new device outputs
    working_node: str
    events: list = field(default_factory=list)  # (allocate, buffer, bytes, on device), in order
    order: list = field(default_factory=list)  # node names in execution order
    device_bytes: list = field(default_factory=list)  # live device bytes while each node runs


def replay(flow, order):
    """Replay ``order`` (nodes of ``flow``) and return the :class:`Timeline`."""
    root = {}  # tensor -> the tensor owning its buffer

    def find(t):
        while root[t] != t:
            root[t] = root[root[t]]
            t = root[t]
        return t

    info = {}
    for node in flow.nodes:
        for out in node.outputs:
            root[out.name] = out.name
            info[out.name] = (node, out)
    for node in flow.nodes:
        for out in node.outputs:
            if out.alias_of in root:
                root[out.name] = find(out.alias_of)
    refs = Counter()
    for node in flow.nodes:
        for t in node.inputs:
            refs[find(t)] += 1
    live = {}  # buffer -> bytes
    device = host = 0
    peak = host_peak = 0
    peak_index, peak_live = -1, {}
    working, working_node = 0, None
    profile, events = [], []
    for index, node in enumerate(order):
        held = Counter(find(t) for t in node.inputs)
        needed = sum(live.get(b, 0) for b in held if not info[b][0].on_host)
        for out in node.outputs:
            if find(out.name) != out.name:
                continue  # an alias: no new buffer
            reused = _forwardable(node, out, held, refs, live, info, find) if node.forwards \
                else None
            if reused is not None:
                root[out.name] = reused
                refs[reused] += refs.pop(out.name, 0)
                continue
            live[out.name] = out.bytes
            events.append((True, out.name, out.bytes, not node.on_host))
            if node.on_host:
                host += out.bytes
            else:
                device += out.bytes
                needed += out.bytes
        if needed > working and not all(find(o.name) != o.name for o in node.outputs):
            working, working_node = needed, node.name
        profile.append(device)
        if device > peak:
            peak, peak_index, peak_live = device, index, dict(live)
        host_peak = max(host_peak, host)
        for buffer, count in held.items():
            buffer = find(buffer)
            refs[buffer] -= count
        for buffer in {find(b) for b in held} | {find(o.name) for o in node.outputs}:
            if refs[buffer] <= 0 and buffer in live:
                size = live.pop(buffer)
                events.append((False, buffer, size, not info[buffer][0].on_host))
                if info[buffer][0].on_host:
                    host -= size
                else:
                    device -= size
    tensors = [LiveTensor(t, info[t][0].name, info[t][0].type, info[t][0].phase, size)
               for t, size in peak_live.items() if not info[t][0].on_host]
    tensors.sort(key=lambda t: -t.bytes)
    return Timeline(peak, peak_index, order[peak_index].name if peak_index >= 0 else None,
                    tensors, host_peak, working, working_node, events, [n.name for n in order],
                    profile)


def _forwardable(node, out, held, refs, live, info, find):
    """The input buffer ``out`` can be written into, or None."""
    for t in node.inputs:
        buffer = find(t)
        if buffer not in live or held[buffer] != 1 or refs[buffer] != 1:
            continue
        owner, source = info[buffer]
        if (owner.on_host == node.on_host and source.bytes == out.bytes
                and source.dtype == out.dtype):
            return buffer
    return None
