"""The one trial harness: train a configured network for a few steps in a fresh process and
measure one step. ``lmstrain maxres`` and every benchmark (``bench-lms``, ``bench-sim``,
``bench-overhead``) run their trials through it.

TensorFlow reads its allocator settings when it starts, so every trial runs in its own process
(:func:`run_trial`: ``python -m lmstrain.planning.harness REQUEST RESULT``, which dies with the
process that started it: :func:`die_with_parent`) with :func:`environment`: TensorFlow's BFC
allocator on CPU (so that ``get_memory_info`` and the profiler's allocation events work),
oneDNN kernels (no huge im2col scratch buffers), one inter-op thread (a reproducible op
order), and, on CPU without swapping, the allocator capped at the budget. A fresh process also
means a fresh allocator without fragmentation.

A trial builds the model with :func:`lmstrain.model.training.training_model` (the configured
dtype policy included), or a ``keras.applications`` model when the request names one
(``application``: compiled with Adam(1e-3) and its loss, random images and integer labels),
splits a CPU into /CPU:0 (compute) and /CPU:1 (host), trains
:data:`WARMUP_STEPS` warm-up steps, ``timed_steps`` timed ones and one measured step, on random
batches that are ``resident`` (one constant batch the dataset holds), ``fresh`` (built inside
the step's ``IteratorGetNext``, no prefetch: the step owns its batch, as a GPU's copy of it)
or ``prefetched`` (tf.data's prefetch holds the next batches). With swapping on CPU the swaps
run in deepcopy mode, so each really copies. What the result holds:

- ``status``: ``ok``; ``oom`` when the step ran out of memory (the child's own
  ResourceExhaustedError, or a measured peak over the budget); ``crash`` (the child died or
  raised; ``reason`` says how) or ``timeout``;
- ``allocator_peak_bytes`` / ``allocator_before_bytes``: ``get_memory_info`` peak during the
  measured step (after ``reset_memory_stats``) and what the allocator held when it began;
- with ``profile``: the profiler's peaks of the measured step
  (:func:`lmstrain.lms.profile.profiled_peaks`: ``step_peak_bytes``,
  ``step_peak_with_scratch_bytes``, ``step_peak_allocation_bytes``, ...), and with swapping
  the checks of the plan (swap nodes live after Grappler, swap-ins started after their
  trigger); with ``op_order`` as well, ``op_order``: the measured step's op names in the order
  they started (``scripts/compare_order.py`` compares it with the simulator's);
- ``measured_peak_bytes`` and ``source`` / ``measure``: the trial's peak and how it was
  obtained (:data:`SOURCES`);
- ``executed_convolutions``: convolution ops in the step's post-optimisation graph (so a
  recomputed convolution Grappler did not merge away counts twice).
"""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

MIB = 2**20
WARMUP_STEPS = 2
BATCHES = ("resident", "fresh", "prefetched")
COMPUTE, HOST = "/CPU:0", "/CPU:1"
MEASURE_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "1",
               "TF_CPU_ALLOCATOR_USE_BFC": "true"}
HOLD_AT, HOLD_PIDFILE = "LMSTRAIN_HOLD_AT", "LMSTRAIN_HOLD_PIDFILE"  # crash tests, hold_point
PARENT_ENV = "LMSTRAIN_TRIAL_PARENT"  # the pid of the process that started the trial
PR_SET_PDEATHSIG = 1  # linux/prctl.h

SOURCES = {
    "gpu": "measured: tf.config.experimental.get_memory_info('GPU:0')['peak'] on a GPU limited "
           "to the budget (logical device memory_limit), after warm-up steps",
    "cpu-capped": "measured: peak of TensorFlow's CPU BFC allocator capped at the budget "
                  "(TF_CPU_BFC_MEM_LIMIT_IN_MB; oneDNN, one inter-op thread), after warm-up "
                  "steps; over the cap raises ResourceExhaustedError",
    "cpu-device-attributed": "measured: uncapped CPU run with swapping in deepcopy mode "
                             "(compute /CPU:0, host /CPU:1); what the BFC allocator held when "
                             "the measured step began (weights, optimizer state) plus the peak "
                             "of the buffers compute-device ops allocated during it, the batch "
                             "included (built inside IteratorGetNext, no prefetch; profiler "
                             "allocation events replayed by address, allocator chunk sizes); "
                             "fits when within the budget",
    "cpu": "measured: uncapped CPU run (BFC allocator, oneDNN, one inter-op thread); "
           "get_memory_info('CPU:0') peak of the measured step",
}


def request(config: dict | None, shape, batch: int, *, swap: dict | None = None,
            budget_bytes: int | None = None, batches: str = "resident", timed_steps: int = 0,
            profile: bool = True, application: dict | None = None, replicas: int = 1,
            op_order: bool = False) -> dict:
    """A trial request (JSON-serialisable): ``config`` as a dict, ``swap`` None or a dict of
    :class:`~lmstrain.lms.SwapSettings` fields, ``budget_bytes`` the device memory the trial
    must fit (None: only measure). ``application`` instead of ``config`` names a
    ``keras.applications`` model: ``{"name": "MobileNetV2", "kwargs": {...}, "loss": ...}``
    (``shape`` its input shape without the batch; ``kwargs["classes"]`` the label range).
    ``replicas`` > 1 trains under ``MirroredStrategy`` on that many logical CPUs (each with its
    own host when swapping), ``batch`` per replica; only the step time is meaningful then (all
    logical CPUs share one allocator). ``op_order`` adds the measured step's op order to the
    result (with ``profile``)."""
    if batches not in BATCHES:
        raise ValueError(f"batches must be one of {BATCHES}; got {batches!r}")
    if (config is None) == (application is None):
        raise ValueError("a request needs either a config or an application")
    req = {"config": config, "shape": [int(s) for s in shape], "batch": batch, "swap": swap,
           "budget_bytes": budget_bytes, "batches": batches, "timed_steps": timed_steps,
           "profile": profile}
    if replicas > 1:
        req["replicas"] = replicas
    if op_order:
        req["op_order"] = True
    return {**req, "application": application} if application is not None else req


def environment(req: dict, gpu: bool) -> dict[str, str]:
    """Environment variables the trial process needs (set before TensorFlow is imported).

    On CPU without swapping, a budget caps the BFC allocator. On a GPU with swapping, the
    pinned host allocator may use all of this machine's RAM for swapped tensors, as in
    ``lmstrain fit``, so that running out of host memory is not read as a device OOM.
    """
    from lmstrain.lms.devices import host_memory_environment

    env = dict(MEASURE_ENV)
    if gpu and req["swap"] is not None:
        env.update(host_memory_environment())
    if not gpu and req["swap"] is None and req["budget_bytes"]:
        env["TF_CPU_BFC_MEM_LIMIT_IN_MB"] = str(max(1, req["budget_bytes"] // MIB))
    return env


def run_trial(req: dict, timeout_s: float = 3600, gpu: bool | None = None,
              workdir: Path | None = None) -> dict:
    """Run the trial ``req`` in a fresh Python process; return its result, with ``status``
    ``timeout`` or ``crash`` when the child gave none.

    ``workdir``: the folder for the request and result files (None: a temporary one); removed
    afterwards.
    """
    if gpu is None:
        from lmstrain.lms.devices import has_gpu
        gpu = has_gpu()
    tmp = Path(workdir or tempfile.mkdtemp(prefix="lmstrain-trial-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        request_path, result_path = tmp / "request.json", tmp / "result.json"
        request_path.write_text(json.dumps(req))
        result_path.unlink(missing_ok=True)  # a result left by a killed run is not this one's
        env = {**os.environ, **environment(req, gpu), PARENT_ENV: str(os.getpid())}
        try:
            child = subprocess.run([sys.executable, "-m", "lmstrain.planning.harness",
                                    str(request_path), str(result_path)], env=env,
                                   timeout=timeout_s, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "reason": f"no result within {timeout_s:.0f} s"}
        if not result_path.exists():
            return {"status": "crash", "reason": death(child.returncode, child.stderr)}
        return json.loads(result_path.read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def death(code: int, stderr: str) -> str:
    """How a child that wrote no result ended: its signal or exit status, and its last words."""
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    noise = ("I0000", "W0000", "E0000", "WARNING: All log", "To enable the following")
    lines = [line.strip() for line in (stderr or "").splitlines()
             if line.strip() and not line.startswith(noise)]
    return f"{how}: {' | '.join(lines[-2:])}"[:500] if lines else how


# --- the child ----------------------------------------------------------------------------

def measure(req: dict) -> dict:
    """Run the trial ``req`` in this process (started with :func:`environment`)."""
    import keras
    import tensorflow as tf

    from lmstrain.lms import LMS, record_graphs, split_cpu
    from lmstrain.lms.devices import has_gpu
    from lmstrain.lms.profile import StepProbe, profiled_peaks

    if os.environ.get("TF_CPU_ALLOCATOR_USE_BFC") != "true":
        raise RuntimeError("the trial needs TF_CPU_ALLOCATOR_USE_BFC=true before TensorFlow "
                           "starts; use run_trial")
    gpu, budget, swap = has_gpu(), req["budget_bytes"], req["swap"]
    if gpu and budget:
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("GPU")[0],
            [tf.config.LogicalDeviceConfiguration(memory_limit=budget // MIB)])
    replicas = req.get("replicas", 1)
    if not gpu:
        split_cpu(replicas * 2 if replicas > 1 and swap is not None else max(2, replicas))
    source = ("gpu" if gpu else "cpu-device-attributed" if swap is not None and budget
              else "cpu-capped" if budget else "cpu")
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(0)
    batch = req["batch"]
    steps = WARMUP_STEPS + req["timed_steps"] + 1  # the last step is the measured one
    result = {"source": source, "measure": SOURCES[source]}
    with tempfile.TemporaryDirectory() as logdir:
        probe = StepProbe(profile_step=steps - 1, logdir=logdir if req["profile"] else None,
                          memory_device="GPU:0" if gpu else "CPU:0")
        callbacks = [probe]
        lms = None
        strategy = (tf.distribute.MirroredStrategy([f"/CPU:{i}" for i in range(replicas)])
                    if replicas > 1 else None)
        if swap is not None:
            alone = gpu or strategy is not None  # the devices come from the GPU or the replicas
            lms = LMS(host_device=None if alone else HOST,
                      compute_device=None if alone else COMPUTE,
                      copy_mode="snapshot" if gpu else "deepcopy", batch_size=batch, **swap)
            callbacks.append(lms)
        try:
            with strategy.scope() if strategy else tf.device(None if gpu else COMPUTE):
                model, data, batch_bytes = _build(req, steps)
            with record_graphs() as recorded:
                model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=callbacks)
        except tf.errors.ResourceExhaustedError as err:
            return {**result, "status": "oom", "reason": _oom_line(err.message)}
        timed = probe.times[WARMUP_STEPS:WARMUP_STEPS + req["timed_steps"]] or probe.times[-1:]
        result.update(step_time_s=statistics.median(timed), step_times_s=timed,
                      allocator_peak_bytes=probe.memory_after["peak"],
                      allocator_before_bytes=probe.memory_before["current"],
                      executed_convolutions=executed_convolutions(recorded.run_metadata))
        if req["profile"]:
            fresh = req["batches"] == "fresh"
            result.update(profiled_peaks(logdir, recorded.run_metadata, COMPUTE,
                                         batch_bytes if fresh else (),
                                         op_order=req.get("op_order", False)))
        if lms is not None and lms.plans:
            result.update(_swap_checks(lms, recorded.run_metadata,
                                       logdir if req["profile"] else None))
    return _verdict(result, source, budget)


def _build(req, steps):
    """``(model, dataset, bytes of each batch tensor)`` of the trial ``req``: lmstrain's
    training model of ``req["config"]`` on image/region batches, or the ``keras.applications``
    model ``req["application"]`` on image/label batches."""
    import keras

    shape, app = tuple(req["shape"]), req.get("application")
    batch = req["batch"] * req.get("replicas", 1)  # a replica's batch times the replicas
    voxels = batch * shape[0] * shape[1] * shape[2]
    if app is None:
        from lmstrain.config import config_from_dict
        from lmstrain.model.training import training_model

        return (training_model(config_from_dict(req["config"]), shape, steps),
                random_batches(shape, batch, req["batches"]), [voxels * 4 * 4, voxels * 3 * 4])
    kwargs = app.get("kwargs", {})
    model = getattr(keras.applications, app["name"])(input_shape=shape, **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=app["loss"], jit_compile=False)
    return (model, random_batches(shape, batch, req["batches"], kwargs.get("classes", 1000)),
            [voxels * 4, batch * 4])


def executed_convolutions(run_metadata) -> int:
    """Convolution ops (forward and gradients) in the largest post-optimisation function graph
    of ``run_metadata``: the training step as Grappler left it, recomputations included."""
    graphs = [f.post_optimization_graph for f in run_metadata.function_graphs]
    step = max(graphs, key=lambda graph: len(graph.node), default=None)
    return sum("Conv" in node.op for node in step.node) if step else 0


def _verdict(result, source, budget):
    """``measured_peak_bytes`` by the trial's source, and ``ok`` or ``oom`` against ``budget``."""
    if source == "cpu-device-attributed":
        peak = result["allocator_before_bytes"] + result["step_peak_allocation_bytes"]
        result.update(measured_peak_bytes=peak, resident_bytes=result["allocator_before_bytes"])
    else:
        peak = result["measured_peak_bytes"] = result["allocator_peak_bytes"]
    if budget and source == "cpu-device-attributed" and peak > budget:
        return {**result, "status": "oom",
                "reason": f"device-attributed peak {peak / MIB:.1f} MiB exceeds the budget of "
                          f"{budget / MIB:.1f} MiB (uncapped measurement)"}
    return {**result, "status": "ok", "reason": ""}


def _swap_checks(lms, run_metadata, logdir):
    """What the callback swapped in the measured function, and whether the swaps were live."""
    from lmstrain.lms import verify_swaps
    from lmstrain.lms.profile import replay

    checked = [(p, c) for p, c in zip(lms.plans, verify_swaps(run_metadata, lms.plans))
               if c.found]
    plan, check = checked[-1] if checked else (lms.plans[-1], None)
    result = {"swapped_tensors": len(plan.swapped), "swapped_bytes": plan.swapped_bytes,
              "swap_ins": len(plan.swap_ins),
              "copied_bytes": plan.swapped_bytes + plan.swapped_in_bytes,
              "recomputed_tensors": len(plan.recomputed),
              "recompute_ops": plan.totals()["recompute_ops"]}
    if check is not None:
        result.update(swap_nodes=check.swap_nodes, live_swap_nodes=check.live_swap_nodes,
                      trigger_edges=check.trigger_edges,
                      intact_trigger_edges=check.intact_trigger_edges,
                      implied_trigger_edges=len(check.implied_trigger_edges),
                      live_recompute_ops=check.live_recompute_ops)
    if logdir:
        timings = replay.swapin_timings(replay.op_runs(replay.load_xspace(logdir)), [plan])
        result["swap_ins_started_after_trigger"] = sum(t.after_trigger for t in timings)
        result["swap_ins_timed"] = len(timings)
    return result


def random_batches(shape, batch: int, batches: str, classes: int | None = None):
    """Random images (normal) and region masks (0/1) as a ``tf.data.Dataset`` of batches;
    with ``classes``, images ``(batch, *shape)`` and int32 labels in ``[0, classes)``.

    ``resident``: one constant batch, repeated (the dataset holds it, as the simulator counts
    an unswapped batch); ``fresh``: samples batched inside the step's ``IteratorGetNext``, no
    prefetch, so the step owns a new batch buffer (tf.data allocates it unnamed;
    :func:`lmstrain.lms.profile.replay.attribute_batch` gives it to ``IteratorGetNext``);
    ``prefetched``: the same with tf.data's prefetch, whose batches then count against a
    capped allocator (without prefetch an OOM there would abort in a tf.data thread instead
    of raising).
    """
    import tensorflow as tf

    def sample(_):
        if classes is not None:
            return (tf.random.normal(shape),
                    tf.random.uniform((), maxval=classes, dtype=tf.int32))
        image = tf.random.normal((*shape, 4))
        regions = tf.cast(tf.random.uniform((*shape, 3)) > 0.5, tf.float32)
        return image, regions

    if batches == "resident":
        return tf.data.Dataset.from_tensors(
            tf.data.Dataset.range(batch).map(sample).batch(batch).get_single_element()).repeat()
    data = tf.data.Dataset.range(1_000_000).map(sample).batch(batch, drop_remainder=True)
    return data if batches == "prefetched" else without_prefetch(data)


def without_prefetch(data):
    """``data`` without tf.data's injected prefetch (nor map-and-batch fusion, which batches
    ahead in its own threads): each batch is built inside the step's ``IteratorGetNext``, so
    the step owns it and no later batch is held meanwhile."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_optimization.inject_prefetch = False
    options.experimental_optimization.map_and_batch_fusion = False
    return data.with_options(options)


def _oom_line(message):
    """The line of a ResourceExhaustedError that says what could not be allocated."""
    start = message.find("OOM when allocating")
    detail = message[start:] if start >= 0 else message
    return f"ResourceExhaustedError: {detail.strip().splitlines()[0][:300]}"


def die_with_parent() -> None:
    """End this trial when the process that started it ends, however it ends (``kill -9``
    included), so that a killed sweep leaves no trial running: on Linux the kernel sends
    SIGKILL when the parent dies (``PR_SET_PDEATHSIG``); a parent already gone before that
    was set ends the trial at once. (An interrupted parent kills the trial itself:
    ``subprocess.run`` kills its child on any exception.)"""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    parent = os.environ.get(PARENT_ENV)
    if parent and os.getppid() != int(parent):
        os._exit(1)


def hold_point(name: str) -> None:
    """For crash tests: when the environment's LMSTRAIN_HOLD_AT is ``name``, write this
    process's pid to LMSTRAIN_HOLD_PIDFILE and wait there (ten minutes at most) to be killed."""
    if os.environ.get(HOLD_AT) == name:
        from lmstrain.atomic import write_text
        write_text(os.environ[HOLD_PIDFILE], str(os.getpid()))
        time.sleep(600)


def main(argv=None):
    request_path, result_path = (argv or sys.argv[1:])[:2]
    die_with_parent()
    hold_point("trial-started")
    req = json.loads(Path(request_path).read_text())
    try:
        result = measure(req)
    except Exception as err:  # any other failure is a crash, reported with its cause
        result = {"status": "crash", "reason": f"{type(err).__name__}: {err}"[:500],
                  "traceback": traceback.format_exc()[-2000:]}
    from lmstrain.atomic import write_text
    write_text(result_path, json.dumps(result))


if __name__ == "__main__":
    main()
