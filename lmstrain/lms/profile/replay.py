"""Measured memory and timing from a TensorFlow profiler trace (xplane).

Logical CPU devices share one allocator, so allocator statistics cannot tell the device from the
host. The profiler's ``MemoryAllocation``/``MemoryDeallocation`` events (recorded with
``TF_CPU_ALLOCATOR_USE_BFC=true``) name the op that allocated each buffer; replaying them by
buffer address and attributing each buffer to its op's device gives a device-resident timeline.
The op-execution events of the same trace show when each swap-in ran relative to its trigger.
"""

import glob
import os
import re
from dataclasses import dataclass

from tensorflow.tsl.profiler.protobuf import xplane_pb2

REPLICA_SCOPE = re.compile(r"replica_\d+")  # MirroredStrategy's name scope of replica i > 0


@dataclass
class OpRun:
    """One execution of an op."""

    name: str
    type: str
    start_ps: int
    end_ps: int


@dataclass
class Buffer:
    """One allocation, from its allocation to its deallocation (None if never freed)."""

    op: str
    bytes: int
    allocation_bytes: int
    region: str
    start_ps: int
    end_ps: int | None  # None: still held when the trace ended


@dataclass
class DevicePeak:
    """The largest total of device-resident buffers, and what was live then."""

    peak_bytes: int
    peak_allocation_bytes: int
    peak_time_ps: int
    live: list
    n_buffers: int

    def top(self, n=10):
        """The ``n`` largest buffers live at the peak, as dicts."""
        return [{"op": b.op, "bytes": b.bytes, "region": b.region}
                for b in sorted(self.live, key=lambda b: -b.bytes)[:n]]


@dataclass
class SwapInTiming:
    swap_in: str
    trigger: str
    swap_in_start_ps: int
    trigger_end_ps: int

    @property
    def after_trigger(self):
        return self.swap_in_start_ps >= self.trigger_end_ps


def load_xspace(logdir):
    """The newest ``*.xplane.pb`` written by ``tf.profiler`` under ``logdir``."""
    files = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {logdir}: was the profiler started?")
    space = xplane_pb2.XSpace()
    with open(max(files, key=os.path.getmtime), "rb") as f:
        space.ParseFromString(f.read())
    return space


def _events(space):
    """(absolute time in ps, event name, stats dict, duration) of every host event."""
    for plane in space.planes:
        if not plane.name.startswith("/host:"):
            continue
        names = {k: v.name for k, v in plane.event_metadata.items()}
        stat_names = {k: v.name for k, v in plane.stat_metadata.items()}
        for line in plane.lines:
            base = line.timestamp_ns * 1000
            for event in line.events:
                yield (base + event.offset_ps, names[event.metadata_id], event, stat_names)


def _stats(event, stat_names):
    out = {}
    for stat in event.stats:
        kind = stat.WhichOneof("value")
        value = getattr(stat, kind) if kind else None
        if kind == "ref_value":
            value = stat_names.get(value)
        out[stat_names.get(stat.metadata_id)] = value
    return out


def op_runs(space):
    """Every op execution in the trace, in start order (events named ``name:Type``)."""
    runs = []
    for time, name, event, _ in _events(space):
        op, sep, op_type = name.rpartition(":")
        if sep and op and "::" not in name and op_type.isidentifier():
            runs.append(OpRun(op, op_type, time, time + event.duration_ps))
    return sorted(runs, key=lambda r: r.start_ps)


def buffers(space):
    """Replay allocation events by address into buffers with lifetimes."""
    events = []
    for time, name, event, stat_names in _events(space):
        if name in ("MemoryAllocation", "MemoryDeallocation"):
            events.append((time, name == "MemoryAllocation", _stats(event, stat_names)))
    live, done = {}, []
    for time, is_alloc, stats in sorted(events, key=lambda e: (e[0], not e[1])):
        addr = stats.get("addr")
        if is_alloc:
            if addr in live:  # freed without an event (outside the trace): close it here
                live[addr].end_ps = time
                done.append(live.pop(addr))
            live[addr] = Buffer(stats.get("tf_op") or "", stats.get("requested_bytes") or 0,
                                stats.get("allocation_bytes") or 0,
                                stats.get("region_type") or "", time, None)
        elif addr in live:
            live[addr].end_ps = time
            done.append(live.pop(addr))
    return sorted(done + list(live.values()), key=lambda b: b.start_ps)


def attribute_batch(space, buffers_, sizes, op_name="IteratorGetNext"):
    """Give the batch's buffers to ``op_name`` (edited in place); return them.

    tf.data allocates the batch without the ``tf_op`` annotation. Without a prefetch stage it
    does so while ``IteratorGetNext`` runs (``IteratorGetNextOp::DoCompute`` events): of the
    unnamed buffers allocated then with one of the batch tensors' ``sizes``, the last of each
    size is the batch (earlier ones are the pipeline's element copies, e.g. at batch size 1).
    """
    spans = [(time, time + event.duration_ps) for time, name, event, _ in _events(space)
             if name == "IteratorGetNextOp::DoCompute"]
    last = {}
    for b in buffers_:
        span = next((s for s in spans if s[0] <= b.start_ps <= s[1]), None)
        if not b.op and b.bytes in sizes and span is not None:
            key = (span, b.bytes)
            if key not in last or b.start_ps >= last[key].start_ps:
                last[key] = b
    batch = sorted(last.values(), key=lambda b: b.start_ps)
    for b in batch:
        b.op, b.region = op_name, "output"
    return batch


def device_peak(buffers_, on_device):
    """Peak of the buffers allocated by ops for which ``on_device(op_name)`` is true.

    A buffer counts from its allocation until it is freed. Buffers of other ops (the host's
    swap-outs, the input pipeline, eager ops) are not counted.
    """
    counted = [b for b in buffers_ if b.op and on_device(b.op)]
    changes = []
    for b in counted:
        changes.append((b.start_ps, 1, b))
        if b.end_ps is not None:
            changes.append((b.end_ps, 0, b))
    total = total_alloc = peak = peak_alloc = peak_time = 0
    for time, is_alloc, b in sorted(changes, key=lambda c: (c[0], c[1])):
        sign = 1 if is_alloc else -1
        total += sign * b.bytes
        total_alloc += sign * b.allocation_bytes
        if total > peak:
            peak, peak_time = total, time
        peak_alloc = max(peak_alloc, total_alloc)
    live = [b for b in counted
            if b.start_ps <= peak_time and (b.end_ps is None or b.end_ps > peak_time)]
    return DevicePeak(peak, peak_alloc, peak_time, live, len(counted))


def op_devices(run_metadata):
    """Map node names in the executed functions' partitions to their device."""
    return {node.name: node.device
            for graph in run_metadata.function_graphs
            for partition in graph.partition_graphs
            for node in partition.node}


def swapin_timings(runs, plans):
    """For each executed swap-in of ``plans``: when it started and when its trigger ended.

    The k-th run of a swap-in is paired with the k-th run of its trigger (one per step).
    Names in the trace carry a function-inlining prefix, so they are matched by suffix; under
    ``MirroredStrategy`` replica i's names start with ``replica_i/`` (i > 0), and a suffix never
    drops that scope.
    """
    by_name = {}
    for run in runs:
        parts = run.name.split("/")
        for start in range(len(parts)):
            if start and REPLICA_SCOPE.fullmatch(parts[start - 1]):
                break  # replica 0's ops have no scope: replica_1/x must not match x
            by_name.setdefault("/".join(parts[start:]), []).append(run)
    timings = []
    for plan in plans:
        for swap_in in plan.swap_ins:
            for trigger in swap_in.trigger:
                for mine, theirs in zip(by_name.get(swap_in.name, []), by_name.get(trigger, [])):
                    timings.append(SwapInTiming(swap_in.name, trigger, mine.start_ps,
                                                theirs.end_ps))
    return timings
