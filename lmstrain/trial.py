"""One training trial in a fresh process: does this shape and batch train within the budget?

Run as ``python -m lmstrain.trial SPEC.json RESULT.json``; :mod:`lmstrain.sweep` starts it
with :func:`environment` (allocator settings must exist before TensorFlow starts, so each
trial gets its own process, fresh allocator included). The trial builds the configured network
at the given shape, trains it on random tensors (one warm-up step, then at least two more),
and writes what happened:

- ``status``: ``ok``, or ``oom`` when the step ran out of memory; the parent marks a child
  that died without a result as ``crash`` and one that ran too long as ``timeout``.
- ``measured_peak_bytes`` and ``source``, saying how the peak was measured:
  GPU: ``get_memory_info`` peak of a GPU limited to the budget (logical device memory_limit);
  CPU without swapping: peak of the BFC allocator capped at the budget
  (``TF_CPU_BFC_MEM_LIMIT_IN_MB``), so going over raises ResourceExhaustedError;
  CPU with swapping: the allocator cannot be capped (host copies share it), so the trial runs
  uncapped in deepcopy measurement mode and the peak is what the allocator held when the
  measured step began plus the compute device's share of the step (replayed from the
  profiler's allocation events); the trial fits when that peak is within the budget.
"""

import json
import statistics
import sys
import tempfile
import traceback
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from lmstrain.atomic import write_text
from lmstrain.config import config_from_dict
from lmstrain.lms import LMS, record_graphs, split_cpu
from lmstrain.lms.trial_memory import (COMPUTE, StepProbe, profiled_peaks,
                                       without_prefetch)
from lmstrain.model import build_model
from lmstrain.train import compile_model

MIB = 2**20
WARMUP_STEPS = 1
TIMED_STEPS = 2

SOURCES = {
    "gpu": "measured: tf.config.experimental.get_memory_info('GPU:0')['peak'] on a GPU limited "
           "to the budget (logical device memory_limit), after a warm-up step",
    "cpu-capped": "measured: peak of TensorFlow's CPU BFC allocator capped at the budget "
                  "(TF_CPU_BFC_MEM_LIMIT_IN_MB; oneDNN, one inter-op thread), after a warm-up "
                  "step; over the cap raises ResourceExhaustedError",
    "cpu-device-attributed": "measured: uncapped CPU run with swapping in deepcopy mode "
                             "(compute /CPU:0, host /CPU:1); what the BFC allocator held when "
                             "the measured step began (weights, optimizer state) plus the peak "
                             "of the buffers compute-device ops allocated during it, the batch "
                             "included (built inside IteratorGetNext, no prefetch; profiler "
                             "allocation events replayed by address, allocator chunk sizes); "
                             "fits when within the budget",
}


def environment(spec, gpu):
    """Environment variables the trial process needs (set before TensorFlow is imported)."""
    env = {"TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "1",
           "TF_CPU_ALLOCATOR_USE_BFC": "true"}
    if not gpu and not spec["lms"]:
        env["TF_CPU_BFC_MEM_LIMIT_IN_MB"] = str(max(1, spec["device_memory_bytes"] // MIB))
    return env


def run(spec):
    """Run the trial described by ``spec`` in this process; return the result dict."""
    with tempfile.TemporaryDirectory() as trace_dir:  # the profiler's trace, if any
        return _run(spec, trace_dir)


def _run(spec, trace_dir):
    budget = spec["device_memory_bytes"]
    gpu = bool(tf.config.list_physical_devices("GPU"))
    if gpu:
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("GPU")[0],
            [tf.config.LogicalDeviceConfiguration(memory_limit=budget // MIB)])
        source = "gpu"
    elif spec["lms"]:
        split_cpu()
        source = "cpu-device-attributed"
    else:
        source = "cpu-capped"
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(0)
    config = config_from_dict(spec["config"])
    shape, batch = tuple(spec["shape"]), spec["batch"]
    steps = WARMUP_STEPS + TIMED_STEPS + 1  # the last step is the measured one
    profile = source == "cpu-device-attributed"
    logdir = trace_dir if profile else None
    probe = StepProbe(profile_step=steps - 1, logdir=logdir,
                      memory_device="GPU:0" if gpu else "CPU:0")
    callbacks = [probe]
    swap = None
    if spec["lms"]:
        swap = LMS(host_device=None, copy_mode="snapshot" if gpu else "deepcopy")
        callbacks.append(swap)
    result = {"source": source, "measure": SOURCES[source]}
    try:
        model = compile_model(build_model(config, shape), config, steps)
        with record_graphs() as recorded:
            model.fit(_random_batches(shape, batch, prefetch=not profile),
                      steps_per_epoch=steps, epochs=1, verbose=0, callbacks=callbacks)
    except tf.errors.ResourceExhaustedError as err:
        return {**result, "status": "oom", "reason": _oom_line(err.message)}
    result["step_time_s"] = statistics.median(probe.times[WARMUP_STEPS:WARMUP_STEPS + TIMED_STEPS])
    if swap is not None and swap.plans:
        result["swapped_bytes"] = swap.plans[-1].swapped_bytes
    if not profile:
        result["measured_peak_bytes"] = probe.memory_after["peak"]
        return {**result, "status": "ok", "reason": ""}
    peaks = profiled_peaks(logdir, recorded.run_metadata, COMPUTE, _batch_bytes(shape, batch))
    resident = probe.memory_before["current"]
    peak = resident + peaks["step_peak_allocation_bytes"]
    result.update(measured_peak_bytes=peak, resident_bytes=resident,
                  step_peak_allocation_bytes=peaks["step_peak_allocation_bytes"])
    if peak > budget:
        return {**result, "status": "oom",
                "reason": f"device-attributed peak {peak / MIB:.1f} MiB exceeds the budget of "
                          f"{budget / MIB:.1f} MiB (uncapped measurement)"}
    return {**result, "status": "ok", "reason": ""}


def _oom_line(message):
    """The line of a ResourceExhaustedError that says what could not be allocated."""
    start = message.find("OOM when allocating")
    detail = message[start:] if start >= 0 else message
    return f"ResourceExhaustedError: {detail.strip().splitlines()[0][:300]}"


def _random_batches(shape, batch, prefetch):
    """Random images and region masks, generated by TensorFlow at each step.

    Without ``prefetch`` they are made inside the step's ``IteratorGetNext``: the step owns
    its batch, as a GPU's copy of it is, and no batch for a later step is counted. (Under a
    capped allocator that would turn an OOM into an abort in a tf.data thread, so capped
    trials keep tf.data's prefetch, whose batches then count against their budget.)
    """

    def make(_):
        image = tf.random.normal((batch, *shape, 4))
        regions = tf.cast(tf.random.uniform((batch, *shape, 3)) > 0.5, tf.float32)
        return image, regions

    data = tf.data.Dataset.range(1_000_000).map(make)
    return data if prefetch else without_prefetch(data)


def _batch_bytes(shape, batch):
    """Bytes of the image and the region batch (float32)."""
    voxels = batch * int(np.prod(shape))
    return [voxels * 4 * 4, voxels * 3 * 4]


def main(argv=None):
    spec_path, result_path = (argv or sys.argv[1:])[:2]
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = run(spec)
    except Exception as err:  # any other failure is a crash, reported with its cause
        result = {"status": "crash", "reason": f"{type(err).__name__}: {err}"[:500],
                  "traceback": traceback.format_exc()[-2000:]}
    write_text(result_path, json.dumps(result))


if __name__ == "__main__":
    main()
