"""The rewrite pipeline, written once: analyse a traced step, plan its swaps, apply the plan.

The ``LMS`` callback runs it on the step Keras traces, the simulator on a step it traces
symbolically (:mod:`lmstrain.lms.sim.trace`), and auto-tune plans each candidate with
:func:`plan_swaps` without applying it (:mod:`lmstrain.lms.sim.autotune`), so all three see
the same plan for the same step and settings.
"""

from collections.abc import Callable
from dataclasses import dataclass

import tensorflow as tf

from lmstrain.lms.graph import StepGraph
from lmstrain.lms.plan import SwapPlan, make_plan
from lmstrain.lms.rewrite import apply_plan
from lmstrain.lms.settings import SwapSettings


@dataclass(frozen=True)
class SwapTarget:
    """Where swapped tensors go and how: the devices, the copy op, whether the step owns its
    batch (:func:`lmstrain.lms.graph.owns_batch`), and which replica of a ``tf.distribute``
    strategy this is (None without one: the whole traced function is the step)."""

    compute_device: str
    host_device: str
    copy_mode: str = "snapshot"
    batch_owned: bool = True
    replica: int | None = None


def analyse_step(graph: tf.Graph, outputs: list, batch_size: int,
                 target: SwapTarget) -> StepGraph:
    """The :class:`StepGraph` of a traced step returning ``outputs`` (one replica's ops when
    ``target`` names a replica)."""
    device = None if target.replica is None else target.compute_device
    return StepGraph.analyse(graph, outputs, batch_size, target.batch_owned, device)


def plan_swaps(step: StepGraph, settings: SwapSettings, target: SwapTarget, *, function: str,
               trace: int, batch_size_source: str) -> SwapPlan:
    """The :class:`SwapPlan` for ``step`` with ``settings``."""
    return make_plan(step, settings, target.compute_device, target.host_device,
                     target.copy_mode, function=function, trace=trace,
                     batch_size_source=batch_size_source, replica=target.replica)


def rewrite_step(graph: tf.Graph, outputs: list, batch_size: int, target: SwapTarget,
                 settings: SwapSettings | Callable[[StepGraph], SwapSettings], *,
                 function: str, trace: int, batch_size_source: str) -> SwapPlan:
    """Analyse, plan and apply swaps to the step being traced in ``graph``; return the plan.

    ``settings`` may be a callable that chooses them from the analysed step (auto-tune).
    """
    step = analyse_step(graph, outputs, batch_size, target)
    chosen = settings(step) if callable(settings) else settings
    plan = plan_swaps(step, chosen, target, function=function, trace=trace,
                      batch_size_source=batch_size_source)
    apply_plan(step, plan)
    return plan
