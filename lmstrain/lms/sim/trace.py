"""Trace any compiled Keras model's training step symbolically and predict its memory.

:func:`trace_train_step` traces ``model.train_step`` with
``tf.function(...).get_concrete_function`` on tensor specs (no data; nothing runs). With swap
settings the trace is rewritten by the same pipeline the ``LMS`` callback runs while Keras
traces (:func:`lmstrain.lms.pipeline.rewrite_step`), so the simulated graph is the one that
would train. :func:`estimate_trace` turns a trace into a
:class:`~lmstrain.lms.sim.estimate.MemoryEstimate`; :func:`estimate_model` does both.

Example::

    import keras
    from lmstrain.lms.sim import estimate_model
    model = keras.applications.MobileNetV2(input_shape=(96, 96, 3), weights=None, classes=10)
    model.compile("adam", "categorical_crossentropy")
    estimate = estimate_model(model, [(8, 96, 96, 3), (8, 10)], executor="cpu")
    estimate.peak_bytes, estimate.op_output_peak_bytes
"""

from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from lmstrain.lms import _tf
from lmstrain.lms.errors import LMSParameterError
from lmstrain.lms.graph import owns_batch
from lmstrain.lms.pipeline import SwapTarget, analyse_step, plan_swaps, rewrite_step
from lmstrain.lms.plan import SwapPlan
from lmstrain.lms.settings import SwapSettings
from lmstrain.lms.sim import autotune, dataflow
from lmstrain.lms.sim.estimate import EXECUTORS, MemoryEstimate, estimate
from lmstrain.lms.sim.simrewrite import with_plan

# Device names written into the traced graph; nothing is placed or run, so they need not exist.
COMPUTE = "/job:localhost/replica:0/task:0/device:CPU:0"
HOST = "/job:localhost/replica:0/task:0/device:CPU:1"
# What a step must run besides its outputs, in creation order, for Grappler run outside the
# runtime (the order of the ops it keeps changes the order of the graph it returns).
VARIABLE_WRITES = frozenset({"AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp"})


@dataclass
class Trace:
    """One traced training step and what the simulator needs to know about it."""

    graph: tf.Graph
    outputs: list[tf.Tensor]
    batch: int
    weight_bytes: int  # trainable weights
    variables: list[tuple[str, int]]  # (category, bytes) of every resident variable
    steps_per_execution: int
    plan: SwapPlan | None = None  # the plan applied while tracing, if any


def target(executor: str, steps_per_execution: int, copy_mode: str = "snapshot") -> SwapTarget:
    """The simulator's swap target for ``executor``, following the callback's batch rule."""
    return SwapTarget(COMPUTE, HOST, copy_mode, owns_batch(executor == "gpu",
                                                           steps_per_execution))


def batch_specs(batch_shapes: Sequence) -> tuple[tf.TensorSpec, ...]:
    """Tensor specs for one batch: each item a ``tf.TensorSpec`` or a shape (float32)."""
    return tuple(s if isinstance(s, tf.TensorSpec) else tf.TensorSpec(tuple(s), tf.float32)
                 for s in batch_shapes)


def trace_train_step(model: keras.Model, specs: Sequence[tf.TensorSpec],
                     settings: SwapSettings | None = None, executor: str = "cpu",
                     copy_mode: str = "snapshot") -> Trace:
    """Trace one training step of the compiled ``model`` on ``specs`` (the batch: inputs,
    targets); with ``settings``, rewritten with swaps as the callback would. Builds the
    optimizer's slots first, so they count as resident."""
    check_executor(executor)
    model.optimizer.build(model.trainable_variables)
    batch = int(specs[0].shape[0])
    steps = int(getattr(model, "steps_per_execution", 1) or 1)
    applied = []

    def train_step(*data):
        outputs = model.train_step(data)
        if settings is not None:
            returned = [t for t in tf.nest.flatten(outputs) if isinstance(t, tf.Tensor)]
            applied.append(rewrite_step(
                tf.compat.v1.get_default_graph(), returned, batch,
                target(executor, steps, copy_mode), settings, function="simulated_train_step",
                trace=1, batch_size_source="traced shape"))
        return outputs

    with _tf.order_insensitive("DeepCopy"):
        graph = tf.function(train_step, autograph=False).get_concrete_function(*specs).graph
    return Trace(graph, list(graph.outputs), batch, trainable_bytes(model),
                 resident_variables(model), steps, applied[-1] if applied else None)


def estimate_trace(trace: Trace, executor: str, device_memory: int | None = None,
                   settings: SwapSettings | None = None) -> MemoryEstimate:
    """The estimate of ``trace``; with ``settings``, of the trace with that swap plan added by
    :func:`~lmstrain.lms.sim.simrewrite.with_plan` (no retracing)."""
    step, flow = analysed(trace, executor)
    plan = trace.plan
    if settings is not None:
        plan = plan_swaps(step, settings, target(executor, trace.steps_per_execution),
                          function=flow.function, trace=1, batch_size_source="traced shape")
        flow = with_plan(flow, plan, executor == "cpu")
    result = estimate(flow, executor, device_memory, trace.weight_bytes, plan)
    result.batch = trace.batch
    return result


def autotune_trace(trace: Trace, base: SwapSettings, device_memory: int,
                   executor: str) -> autotune.Choice:
    """Auto-tune ``base`` for ``device_memory`` on an unswapped ``trace``: each candidate plan
    is simulated on the one trace (:func:`~lmstrain.lms.sim.autotune.tune`)."""
    if not device_memory:
        raise LMSParameterError("auto-tune needs a device memory budget in bytes; got none.",
                                key="device_memory")
    step, flow = analysed(trace, executor)
    choice = autotune.tune(step, flow, base, device_memory,
                           target(executor, trace.steps_per_execution), executor=executor,
                           weight_bytes=trace.weight_bytes)
    choice.estimate.batch = trace.batch
    return choice


def estimate_model(model: keras.Model, batch_shapes: Sequence, *, executor: str = "cpu",
                   settings: SwapSettings | None = None, autotune_budget: int | None = None,
                   device_memory: int | None = None) -> MemoryEstimate:
    """Predict the device memory of one training step of the compiled ``model``.

    Args:
        model: a compiled Keras model (TensorFlow backend).
        batch_shapes: one batch as ``model.fit`` would get it, e.g. ``[(8, 96, 96, 3), (8,
            10)]`` for inputs and targets; each item a shape (float32) or a ``tf.TensorSpec``.
        executor: ``"cpu"`` or ``"gpu"``: whose execution order to emulate.
        settings: swap with these settings (None: no swapping).
        autotune_budget: auto-tune ``settings`` (or the defaults) for this device memory in
            bytes, as ``LMS(autotune=True)`` would; raises
            :class:`~lmstrain.lms.errors.BoundExceededError` when no plan fits.
        device_memory: the budget Grappler sees (its AddN rewrite) and the allocator model's
            limit; defaults to ``autotune_budget``.
    """
    specs = batch_specs(batch_shapes)
    budget = device_memory or autotune_budget
    if autotune_budget:
        trace = trace_train_step(model, specs, executor=executor)
        return autotune_trace(trace, settings or SwapSettings(), autotune_budget,
                              executor).estimate
    return estimate_trace(trace_train_step(model, specs, settings, executor), executor, budget)


def resident_variables(model: keras.Model) -> list[tuple[str, int]]:
    """``(category, bytes)`` of every variable of a compiled ``model``: weights, optimizer
    state (slots and counters) and metric state."""
    return ([("weights", _bytes(v)) for v in model.weights]
            + [("optimizer", _bytes(v)) for v in model.optimizer.variables]
            + [("metrics", _bytes(v)) for v in model.metrics_variables])


def trainable_bytes(model: keras.Model) -> int:
    """Bytes of the trainable weights (as many bytes of gradients exist after backward)."""
    return sum(_bytes(v) for v in model.trainable_variables)


def check_executor(executor: str) -> None:
    if executor not in EXECUTORS:
        raise LMSParameterError(f"executor must be one of {', '.join(EXECUTORS)}; got "
                                f"{executor!r}.", key="executor")


def analysed(trace: Trace, executor: str):
    """``(step, flow)``: the :class:`~lmstrain.lms.graph.StepGraph` of ``trace`` and its
    :class:`~lmstrain.lms.sim.dataflow.Dataflow` for ``executor``."""
    step = analyse_step(trace.graph, trace.outputs, trace.batch,
                        target(executor, trace.steps_per_execution))
    flow = dataflow.build(step, COMPUTE, trace.variables, cpu_executor=executor == "cpu")
    if trace.plan is not None and executor == "cpu":
        writes = [op for op in trace.graph.get_operations() if op.type in VARIABLE_WRITES]
        names = _tf.grappler_order(trace.graph, trace.outputs + writes)
        flow.positions = {name: i for i, name in enumerate(names)}
    return step, flow


def _bytes(variable):
    return int(np.prod(variable.shape)) * tf.as_dtype(variable.dtype).size
