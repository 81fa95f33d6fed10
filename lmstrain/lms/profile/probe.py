"""Measure a training step from inside the process: time every step, profile one, and
replay the profiler's allocation events into device-attributed peaks.

:class:`StepProbe` is a Keras callback; :func:`profiled_peaks` reads its trace with
:mod:`lmstrain.lms.profile.replay`, counting only buffers allocated by ops placed on the
compute device (placement from the executed partition graphs of
:func:`lmstrain.lms.record_graphs`). Its peaks, of one step, without what was resident when
the step began:

- ``step_peak_bytes``: op outputs only (requested bytes; the running sums Grappler makes of
  large AddN ops count as outputs, though the profiler files them as scratch); the quantity
  the simulator predicts as ``MemoryEstimate.step_peak_bytes``;
- ``step_peak_with_scratch_bytes``: outputs and kernel scratch (requested bytes);
- ``step_peak_allocation_bytes``: the same in the allocator's chunk sizes.
"""

import time

import keras
import tensorflow as tf

from lmstrain.lms import devices
from lmstrain.lms.profile import replay


def profiled_peaks(logdir: str, run_metadata, compute_device: str,
                   input_bytes=(), op_order: bool = False) -> dict:
    """Device-attributed peaks from a profiler trace in ``logdir`` (see the module docstring).

    Op placement comes from the executed partition graphs in ``run_metadata``; the buffers of
    ops on other devices (swap-outs to the host, the input pipeline) are not counted. The
    batch's buffers (``input_bytes``: the bytes of each batch tensor) count as outputs of
    ``IteratorGetNext`` when tf.data built them during the step (``fresh_batches``). With
    ``op_order``, ``op_order`` lists the step's op names in the order they started.
    """
    placement = replay.op_devices(run_metadata)

    def on_compute(op):
        return op in placement and devices.same(placement[op], compute_device)

    space = replay.load_xspace(logdir)
    buffers = replay.buffers(space)
    runs = replay.op_runs(space)
    getters = [name for name, device in placement.items() if name.endswith("IteratorGetNext")]
    inputs = (replay.attribute_batch(space, buffers, set(input_bytes), min(getters))
              if getters and input_bytes else [])
    first = min((r.start_ps for r in runs), default=0)
    last = max((r.end_ps for r in runs), default=0)
    every = replay.device_peak(buffers, on_compute)
    sums = {r.name for r in runs if r.type == "TemporaryVariable"}  # Grappler's AddN sums
    outputs = replay.device_peak([b for b in buffers if b.region == "output" or b.op in sums],
                                  on_compute)
    uncounted = [b for b in buffers if not on_compute(b.op)]
    peaks = {
        "step_peak_bytes": outputs.peak_bytes,
        "step_peak_with_scratch_bytes": every.peak_bytes,
        "step_peak_allocation_bytes": every.peak_allocation_bytes,
        "peak_at_op": op_at(runs, every.peak_time_ps),
        "live_at_peak": every.top(8),
        "device_plus_host_peak_bytes": replay.device_peak(buffers, lambda op: True).peak_bytes,
        "buffers_not_counted": {
            "swap_out_host_copies": sum("/lms/" in b.op for b in uncounted),
            "other": sum("/lms/" not in b.op for b in uncounted),
        },
        # The batch's buffers (with fresh batches): when the step freed them, in ps from its
        # first op (None: still held when the trace ended), and the step's length.
        "input_buffers": [{"op": b.op, "bytes": b.bytes,
                           "freed_ps": None if b.end_ps is None else b.end_ps - first}
                          for b in inputs if on_compute(b.op)],
        "step_ps": last - first,
    }
    if op_order:
        peaks["op_order"] = [r.name for r in runs]
    return peaks


def op_at(runs, time_ps):
    """The op running at ``time_ps`` (or the last one that started before)."""
    before = [r for r in runs if r.start_ps <= time_ps]
    return before[-1].name if before else None


class StepProbe(keras.callbacks.Callback):
    """Times every step; at step ``profile_step`` profiles it (unless ``logdir`` is None) and,
    when ``memory_device`` is set, resets the allocator's peak before it and reads
    ``get_memory_info`` around it."""

    def __init__(self, profile_step, logdir, memory_device=None):
        super().__init__()
        self.profile_step, self.logdir, self.memory_device = profile_step, logdir, memory_device
        self.times, self.memory_before, self.memory_after = [], None, None

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.profile_step:
            if self.memory_device:
                tf.config.experimental.reset_memory_stats(self.memory_device)
                self.memory_before = tf.config.experimental.get_memory_info(self.memory_device)
            if self.logdir:
                tf.profiler.experimental.start(self.logdir)
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)
        if batch == self.profile_step:
            if self.logdir:
                tf.profiler.experimental.stop()
            if self.memory_device:
                self.memory_after = tf.config.experimental.get_memory_info(self.memory_device)
