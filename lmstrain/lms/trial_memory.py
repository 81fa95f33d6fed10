"""Measure one training step's memory on CPU, in a fresh process.

TensorFlow reads its allocator settings when it starts, so every measurement runs in its own
process (:func:`run_in_subprocess`) with :data:`MEASURE_ENV`: the BFC allocator (so that
``get_memory_info`` and the profiler's allocation events work), oneDNN kernels (no huge
im2col scratch buffers), and one inter-op thread (a reproducible op order). The CPU is split
into /CPU:0 (compute) and /CPU:1 (host); with swapping, LMS runs in deepcopy mode so that each
swap really copies. A fresh process also means a fresh allocator without fragmentation.

What is measured, per step (the last of a few, after warm-up):

- ``allocator_peak_bytes``: ``get_memory_info("CPU:0")["peak"]`` after ``reset_memory_stats``
  just before the step: everything the BFC allocator held, rounding included (device and host
  share this allocator, so it is only the device's figure without swapping);
- ``allocator_before_bytes``: what it held when the step started (weights, optimizer state,
  the batch, constants);
- ``op_output_peak_bytes`` / ``step_peak_bytes`` / ``step_peak_allocation_bytes``: the
  profiler's allocation events replayed by address (:mod:`lmstrain.lms.measure`), counting the
  buffers allocated by ops placed on the compute device: op outputs only (requested bytes; the
  running sums Grappler makes of large AddN ops count as outputs, though the profiler files
  them as scratch); outputs and kernel scratch (requested bytes); the same in the allocator's
  chunk sizes.

    python -m lmstrain.lms.trial_memory REQUEST.json RESULT.json   # what run_in_subprocess does
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from lmstrain.config import config_from_dict
from lmstrain.lms import LMS, devices, measure, record_graphs, split_cpu
from lmstrain.model import build_model
from lmstrain.train import compile_model

MEASURE_ENV = {"TF_CPU_ALLOCATOR_USE_BFC": "true", "TF_ENABLE_ONEDNN_OPTS": "1",
               "TF_CPP_MIN_LOG_LEVEL": "2"}
COMPUTE, HOST = "/CPU:0", "/CPU:1"
WARMUP_STEPS = 2


class MeasurementError(RuntimeError):
    """A measurement subprocess failed; the message holds the end of its output."""


def run_in_subprocess(request, timeout=3600):
    """Run :func:`measure_step` for ``request`` (a JSON-serialisable dict of its arguments,
    with ``config`` as a dict) in a new process with :data:`MEASURE_ENV`; return its result."""
    with tempfile.TemporaryDirectory() as tmp:
        request_file, result_file = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_file.write_text(json.dumps(request))
        env = {**os.environ, **MEASURE_ENV}
        done = subprocess.run([sys.executable, "-m", "lmstrain.lms.trial_memory",
                               str(request_file), str(result_file)], env=env,
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not result_file.exists():
            raise MeasurementError(f"memory measurement failed (exit {done.returncode}): "
                                   f"{done.stderr[-2000:]}")
        return json.loads(result_file.read_text())


def measure_step(config, shape, batch, swap=None, steps=WARMUP_STEPS + 1, fresh_batches=False):
    """Train ``config``'s network at ``shape`` for ``steps`` steps on random data; measure the
    last. ``swap``: None, or a dict of :class:`~lmstrain.lms.SwapSettings` fields (swapping
    in deepcopy mode). Call in a process started with :data:`MEASURE_ENV`.

    By default every step reads the same batch, a constant the dataset holds (resident, as
    the simulator counts unswapped inputs). With ``fresh_batches`` the iterator builds a new
    batch buffer each step, inside ``IteratorGetNext`` (no prefetch), as a real pipeline
    does: the step then owns the batch, it counts towards the device's peaks, and
    ``input_buffers`` says when each was freed."""

    if os.environ.get("TF_CPU_ALLOCATOR_USE_BFC") != "true":
        raise MeasurementError("measure_step needs TF_CPU_ALLOCATOR_USE_BFC=true in the "
                               "environment before TensorFlow starts; use run_in_subprocess")
    split_cpu()
    tf.config.threading.set_inter_op_parallelism_threads(1)
    if isinstance(config, dict):
        config = config_from_dict(config)
    keras.utils.set_random_seed(0)
    with tf.device(COMPUTE):
        model = compile_model(build_model(config, shape), config, steps)
        rng = np.random.default_rng(0)
        x = tf.constant(rng.normal(size=(batch, *shape, 4)).astype("float32"))
        y = tf.constant((rng.random((batch, *shape, 3)) > 0.5).astype("float32"))
    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    if fresh_batches:
        data = without_prefetch(data.unbatch().batch(batch, drop_remainder=True))
    callbacks = []
    lms = None
    if swap is not None:
        lms = LMS(host_device=HOST, compute_device=COMPUTE, copy_mode="deepcopy", **swap)
        callbacks.append(lms)
    with tempfile.TemporaryDirectory() as logdir:
        probe = StepProbe(profile_step=steps - 1, logdir=logdir, memory_device="CPU:0")
        with record_graphs() as recorded:
            model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0,
                      callbacks=callbacks + [probe])
        peaks = profiled_peaks(logdir, recorded.run_metadata, COMPUTE,
                               [x.shape.num_elements() * 4, y.shape.num_elements() * 4])
    result = {
        "shape": list(shape), "batch": batch, "swap": swap, "fresh_batches": fresh_batches,
        "allocator_peak_bytes": probe.memory_after["peak"],
        "allocator_before_bytes": probe.memory_before["current"],
        "step_time_s": probe.times[-1],
        **peaks,
    }
    if lms is not None and lms.plans:
        plan = lms.plans[-1]
        result.update(swapped_tensors=len(plan.swapped), swapped_bytes=plan.swapped_bytes)
    return result


def without_prefetch(data):
    """``data`` without tf.data's injected prefetch: each batch is built inside the step's
    ``IteratorGetNext``, so the step owns it and no later batch is held meanwhile."""
    options = tf.data.Options()
    options.experimental_optimization.inject_prefetch = False
    return data.with_options(options)


def profiled_peaks(logdir, run_metadata, compute_device, input_bytes=()):
    """Device-attributed peaks from a profiler trace in ``logdir`` (see the module docstring).

    Op placement comes from the executed partition graphs in ``run_metadata``; the buffers of
    ops on other devices (swap-outs to the host, the input pipeline) are not counted. The
    batch's buffers (``input_bytes``: the bytes of each batch tensor) count as outputs of
    ``IteratorGetNext`` when tf.data built them during the step (``fresh_batches``).
    """
    placement = measure.op_devices(run_metadata)

    def on_compute(op):
        return op in placement and devices.same(placement[op], compute_device)

    space = measure.load_xspace(logdir)
    buffers = measure.buffers(space)
    runs = measure.op_runs(space)
    getters = [name for name, device in placement.items() if name.endswith("IteratorGetNext")]
    inputs = (measure.attribute_batch(space, buffers, set(input_bytes), min(getters))
              if getters and input_bytes else [])
    first = min((r.start_ps for r in runs), default=0)
    last = max((r.end_ps for r in runs), default=0)
    every = measure.device_peak(buffers, on_compute)
    sums = {r.name for r in runs if r.type == "TemporaryVariable"}  # Grappler's AddN sums
    outputs = measure.device_peak([b for b in buffers if b.region == "output" or b.op in sums],
                                  on_compute)
    uncounted = [b for b in buffers if not on_compute(b.op)]
    return {
        "op_output_peak_bytes": outputs.peak_bytes,
        "step_peak_bytes": every.peak_bytes,
        "step_peak_allocation_bytes": every.peak_allocation_bytes,
        "peak_at_op": op_at(runs, every.peak_time_ps),
        "live_at_peak": every.top(8),
        "device_plus_host_peak_bytes": measure.device_peak(buffers, lambda op: True).peak_bytes,
        "buffers_not_counted": {
            "swap_out_host_copies": sum("/lms/" in b.op for b in uncounted),
            "other": sum("/lms/" not in b.op for b in uncounted),
        },
        "executed_ops": [r.name for r in runs],
        # The batch's buffers (with fresh batches): when the step freed them, in ps from its
        # first op (None: still held when the trace ended), and the step's length.
        "input_buffers": [{"op": b.op, "bytes": b.bytes,
                           "freed_ps": None if b.end_ps is None else b.end_ps - first}
                          for b in inputs if on_compute(b.op)],
        "step_ps": last - first,
    }


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


def main(argv=None):
    request_file, result_file = (argv or sys.argv[1:])[:2]
    request = json.loads(Path(request_file).read_text())
    result = measure_step(request["config"], tuple(request["shape"]), request["batch"],
                          request.get("swap"), request.get("steps", WARMUP_STEPS + 1),
                          request.get("fresh_batches", False))
    Path(result_file).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
