"""Predict a training step's device memory for a config, an input size and a batch size.

:func:`simulate_step` builds the configured network at ``shape``, compiles it as ``lmstrain
fit`` does, and traces one training step symbolically (``tf.function(...)
.get_concrete_function`` on tensor specs: no data, nothing runs). With a swap plan, the trace
is rewritten by the same :func:`~lmstrain.lms.plan.make_plan` and
:func:`~lmstrain.lms.rewrite.apply_plan` the ``LMS`` callback uses while Keras traces, so the
simulated graph is the one that would train. :mod:`lmstrain.lms.estimate` turns the trace into
a :class:`~lmstrain.lms.estimate.MemoryEstimate`.

Example::

    from lmstrain.config import load_config
    from lmstrain.lms import simulate_step
    estimate = simulate_step(load_config("configs/demo.yaml"), (48, 48, 48), batch=2)
    estimate.peak_bytes, estimate.bound_bytes, estimate.bound_op
"""

from dataclasses import dataclass, fields

import keras
import numpy as np
import tensorflow as tf

from lmstrain.lms import autotune, dataflow
from lmstrain.lms.estimate import estimate
from lmstrain.lms.graph import StepGraph
from lmstrain.lms.plan import make_plan
from lmstrain.lms.rewrite import apply_plan
from lmstrain.lms.settings import LMSParameterError, SwapSettings
from lmstrain.lms.simrewrite import with_plan
from lmstrain.model import build_model

N_CHANNELS, N_REGIONS = 4, 3
TRACE_CACHE_SIZE = 6
_TRACES = {}
# Device names written into the traced graph; nothing is placed or run, so they need not exist.
COMPUTE, HOST = "/job:localhost/replica:0/task:0/device:CPU:0", \
    "/job:localhost/replica:0/task:0/device:CPU:1"


@dataclass
class Trace:
    """One traced training step and what the simulator needs to know about it."""

    graph: object
    outputs: list
    shape: tuple
    batch: int
    weight_bytes: int  # trainable weights
    variables: list  # (category, bytes)
    plan: object = None  # the SwapPlan applied while tracing, if any


def simulate_step(config, shape, batch, plan=None, *, executor=None, device_memory=None):
    """Predict the device memory of one training step of ``config``'s network.

    Args:
        config: a :class:`lmstrain.config.Config`.
        shape: the input size (x, y, z); each edge a multiple of the network's divisor.
        batch: volumes per step.
        plan: None (no swapping); True (swap with ``config.lms``'s settings, auto-tuned for
            the budget when ``config.lms.autotune`` is set); or a :class:`SwapSettings`.
        executor: ``"cpu"`` or ``"gpu"``: whose execution order to emulate; None = this
            machine's (GPU when TensorFlow sees one).
        device_memory: the budget in bytes (auto-tune; Grappler's view of a GPU); None =
            ``config.lms.device_memory``.

    Returns a :class:`~lmstrain.lms.estimate.MemoryEstimate`.
    """
    executor = executor or default_executor()
    budget = device_memory if device_memory is not None else config.lms.device_memory
    if plan is None:
        return estimate_trace(cached_trace(config, shape, batch), executor, budget)
    settings = settings_from_config(config) if plan is True else plan
    if plan is True and config.lms.autotune:
        return autotune_step(config, shape, batch, budget, executor).estimate
    return estimate_trace(trace_step(config, shape, batch, settings), executor, budget)


def autotune_step(config, shape, batch, device_memory, executor=None, retrace=True):
    """Auto-tune ``config.lms``'s settings for ``device_memory`` at ``shape`` and ``batch``;
    return the :class:`~lmstrain.lms.autotune.Choice`.

    The search simulates each candidate plan on one trace (:func:`estimate_trace`); with
    ``retrace``, the choice's estimate is then of the step traced and rewritten with the
    chosen settings, as the ``LMS`` callback would (the two agree; the tests check it).
    """
    executor = executor or default_executor()
    if not device_memory:
        raise LMSParameterError(
            "auto-tune needs a device memory budget; got none. Set lms.device_memory (e.g. "
            "16GiB) or pass --device-memory.")
    trace = cached_trace(config, shape, batch)
    step = StepGraph.analyse(trace.graph, trace.outputs, batch)
    flow = dataflow.build(step, COMPUTE, trace.variables, cpu_executor=executor == "cpu")
    choice = autotune.tune(step, flow, settings_from_config(config), device_memory,
                           COMPUTE, HOST, executor=executor, weight_bytes=trace.weight_bytes)
    if retrace:
        choice.estimate = estimate_trace(trace_step(config, shape, batch, choice.settings),
                                         executor, device_memory)
    choice.estimate.shape, choice.estimate.batch = list(trace.shape), batch
    return choice


def estimate_trace(trace, executor, device_memory=None, settings=None):
    """The :class:`MemoryEstimate` of a :class:`Trace`; with ``settings``, of the trace with
    that swap plan added by :func:`~lmstrain.lms.simrewrite.with_plan` (no retracing)."""
    step = StepGraph.analyse(trace.graph, trace.outputs, trace.batch)
    flow = dataflow.build(step, COMPUTE, trace.variables, cpu_executor=executor == "cpu")
    plan = trace.plan
    if settings is not None:
        plan = make_plan(step, settings, COMPUTE, HOST, "snapshot", function=flow.function,
                         trace=1, batch_size_source="traced shape")
        flow = with_plan(flow, plan, executor == "cpu")
    result = estimate(flow, executor, device_memory, trace.weight_bytes, plan)
    result.shape, result.batch = list(trace.shape), trace.batch
    return result


def cached_trace(config, shape, batch):
    """:func:`trace_step` without swapping, remembered for the last few configs and sizes
    (tracing the paper's network takes seconds; searches ask for the same sizes again)."""
    key = (repr(config.to_dict()), tuple(int(s) for s in shape), batch)
    if key not in _TRACES:
        if len(_TRACES) >= TRACE_CACHE_SIZE:
            del _TRACES[next(iter(_TRACES))]
        _TRACES[key] = trace_step(config, shape, batch)
    return _TRACES[key]


def trace_step(config, shape, batch, settings=None, copy_mode="snapshot"):
    """Build, compile and symbolically trace one training step; rewrite it with ``settings``.

    Nothing runs: the step is traced on tensor specs of ``(batch, *shape, 4)`` images and
    ``(batch, *shape, 3)`` targets, after the optimizer has built its slots.
    """
    from lmstrain.train import compile_model  # lmstrain.train imports lmstrain.lms

    shape = tuple(int(s) for s in shape)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16" if config.train.mixed_precision else "float32")
    try:
        model = compile_model(build_model(config, shape), config, steps_per_epoch=1)
    finally:
        keras.config.set_dtype_policy(previous)
    model.optimizer.build(model.trainable_variables)
    specs = (tf.TensorSpec((batch, *shape, N_CHANNELS), tf.float32),
             tf.TensorSpec((batch, *shape, N_REGIONS), tf.float32))
    applied = []

    def train_step(data):
        outputs = model.train_step(data)
        if settings is not None:
            returned = [t for t in tf.nest.flatten(outputs) if isinstance(t, tf.Tensor)]
            step = StepGraph.analyse(tf.compat.v1.get_default_graph(), returned, batch)
            plan = make_plan(step, settings, COMPUTE, HOST, copy_mode,
                             function="simulated_train_step", trace=1,
                             batch_size_source="traced shape")
            apply_plan(step, plan)
            applied.append(plan)
        return outputs

    concrete = tf.function(train_step, autograph=False).get_concrete_function(specs)
    graph = concrete.graph
    return Trace(graph, list(graph.outputs), shape, batch, trainable_bytes(model),
                 resident_variables(model), applied[-1] if applied else None)


def resident_variables(model):
    """``(category, bytes)`` of every variable of a compiled ``model``: weights, optimizer
    state (slots and counters) and metric state."""
    return ([("weights", _bytes(v)) for v in model.weights]
            + [("optimizer", _bytes(v)) for v in model.optimizer.variables]
            + [("metrics", _bytes(v)) for v in model.metrics_variables])


def trainable_bytes(model):
    """Bytes of the trainable weights (as many bytes of gradients exist after backward)."""
    return sum(_bytes(v) for v in model.trainable_variables)


def settings_from_config(config):
    """The :class:`SwapSettings` named by ``config.lms``."""
    names = {f.name for f in fields(SwapSettings)}
    return SwapSettings(**{k: v for k, v in vars(config.lms).items() if k in names})


def default_executor():
    """``"gpu"`` when TensorFlow sees a GPU, else ``"cpu"``."""
    return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"


def _bytes(variable):
    return int(np.prod(variable.shape)) * tf.as_dtype(variable.dtype).size
