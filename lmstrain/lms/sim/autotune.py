"""Auto-tune: the swap settings that fit a device memory budget with the least swapping.

The search follows TFLMS v2's: with the prefetch distance and grouping fixed, find the
largest ``swapout_threshold`` (fewest tensors swapped) whose predicted peak fits; then the
largest ``swapin_ahead`` that still fits (the earliest safe prefetch); then the largest
``swapin_groupby`` (fewest swap-ins). With ``recompute: auto`` the search runs again with cheap
tensors recomputed, against a smaller limit (``RECOMPUTE_MARGIN``: the allocator's chunks of
recomputing plans can exceed the predicted peak), and the plan that copies fewer bytes is
chosen. Each candidate is planned by the same :func:`~lmstrain.lms.plan.make_plan` the callback
uses and simulated on the traced step (:func:`~lmstrain.lms.sim.simrewrite.with_plan`). When
the step fits without swapping, nothing is swapped. When even the physical bound (weights,
optimizer state, gradients and the largest single op) does not fit, no plan can help:
:class:`~lmstrain.lms.settings.LMSParameterError` names the op.
"""

import dataclasses
from dataclasses import dataclass, field

from lmstrain.lms.errors import BoundExceededError
from lmstrain.lms.graph import StepGraph
from lmstrain.lms.pipeline import SwapTarget, plan_swaps
from lmstrain.lms.settings import SwapSettings
from lmstrain.lms.sim.dataflow import Dataflow
from lmstrain.lms.sim.estimate import MemoryEstimate, estimate
from lmstrain.lms.sim.simrewrite import with_plan
from lmstrain.lms.units import format_bytes


@dataclass
class Choice:
    """The chosen settings, their predicted peak, and every candidate tried."""

    settings: SwapSettings
    peak_bytes: int
    budget_bytes: int
    swapped_bytes: int
    swapped_tensors: int
    tried: list[tuple[dict, int]] = field(default_factory=list)  # (settings, predicted peak)
    estimate: MemoryEstimate | None = None  # of the chosen plan

    def summary(self):
        """One line for the log."""
        s = self.settings
        if not self.swapped_tensors:
            return (f"LMS auto-tune: the step fits in {format_bytes(self.budget_bytes)} without "
                    f"swapping (predicted peak {format_bytes(self.peak_bytes)})")
        return (f"LMS auto-tune: swapout_threshold={s.swapout_threshold}, swapin_ahead="
                f"{s.swapin_ahead}, swapin_groupby={s.swapin_groupby}"
                f"{', recompute=' + s.recompute if s.recompute != 'none' else ''}: "
                f"{self.swapped_tensors} "
                f"tensors ({format_bytes(self.swapped_bytes)}) swapped per step, predicted peak "
                f"{format_bytes(self.peak_bytes)} of {format_bytes(self.budget_bytes)} "
                f"({len(self.tried)} candidates simulated)")


# With ``recompute: auto``, a recomputing plan must fit ``budget / (1 + RECOMPUTE_MARGIN)``:
# bench/results/peers: at 112^3 the allocator's chunks came to 1.36x the peak the simulator
# then predicted (it under-predicted recomputing plans' op outputs by up to 17%, since fixed:
# bench/results/simulator_accuracy.json), the requested bytes matching swapping alone.
RECOMPUTE_MARGIN = 0.4


def tune(step: StepGraph, flow: Dataflow, base: SwapSettings, budget: int, target: SwapTarget,
         *, executor: str = "cpu", weight_bytes: int = 0) -> Choice:
    """Choose settings for ``step`` and ``flow`` (its unrewritten :class:`Dataflow`), starting
    from ``base`` (filters, sync mode and minimum size are kept).
    """
    tried = []

    def evaluate(settings):
        plan = plan_swaps(step, settings, target, function=flow.function, trace=0,
                          batch_size_source="auto-tune")
        result = estimate(with_plan(flow, plan, executor == "cpu"), executor, budget,
                          weight_bytes, plan)
        tried.append((settings.to_dict(), result.peak_bytes))
        return result

    auto = base.recompute == "auto"
    if auto:
        base = dataclasses.replace(base, recompute="none")
    levels = step.n_levels
    none = dataclasses.replace(base, swapout_threshold=levels)
    unswapped = evaluate(none)
    if unswapped.fits(budget):
        return _choice(none, unswapped, budget, tried)
    chosen = _least_swapping(evaluate, base, budget, levels)
    if chosen is None:
        _refuse(unswapped, tried[-1][1], budget)
    result = evaluate(chosen)
    if auto:
        recomputing = _least_swapping(evaluate, dataclasses.replace(base, recompute="cheap"),
                                      int(budget / (1 + RECOMPUTE_MARGIN)), levels)
        if recomputing is not None:
            alternative = evaluate(recomputing)
            if _copied(alternative) < _copied(result):
                chosen, result = recomputing, alternative
    return _choice(chosen, result, budget, tried)


def _least_swapping(evaluate, base, limit, levels):
    """TFLMS v2's search from ``base``: the settings whose predicted peak fits ``limit`` with
    the least swapping, the earliest prefetch and the coarsest grouping; None if swapping every
    eligible tensor does not fit."""

    def fits(settings):
        return evaluate(settings).fits(limit)

    most = dataclasses.replace(base, swapout_threshold=0, swapin_ahead=1, swapin_groupby=0)
    if not fits(most):
        return None
    threshold = _largest(lambda t: fits(dataclasses.replace(most, swapout_threshold=t)), 0,
                         levels - 1)
    chosen = dataclasses.replace(most, swapout_threshold=threshold)
    ahead = _largest(lambda a: fits(dataclasses.replace(chosen, swapin_ahead=a)), 1, levels)
    chosen = dataclasses.replace(chosen, swapin_ahead=ahead)
    groupby = _largest(lambda g: fits(dataclasses.replace(chosen, swapin_groupby=g)), 0, levels)
    return dataclasses.replace(chosen, swapin_groupby=groupby)


def _copied(result):
    """Bytes a plan copies per step: out once, back once per swap-in."""
    return result.swapped_bytes + result.swapped_in_bytes


def _largest(ok, low, high):
    """The largest value in [low, high] for which ``ok`` holds, given ``ok(low)``.

    Gallops up from ``low`` (steps 1, 2, 4, ...) until ``ok`` fails, then bisects; like the
    search in TFLMS v2, it assumes ``ok`` is monotonic.
    """
    good, bad, step = low, high + 1, 1
    while good + step < bad:
        if not ok(good + step):
            bad = good + step
            break
        good += step
        step *= 2
    while bad - good > 1:
        middle = (good + bad) // 2
        if ok(middle):
            good = middle
        else:
            bad = middle
    return good


def _choice(settings, result, budget, tried):
    return Choice(settings, result.peak_bytes, budget, result.swapped_bytes,
                  result.swapped_tensors, tried, result)


def _refuse(unswapped, best, budget):
    """Raise: no plan fits ``budget``; name the op that sets the bound when it is the cause."""
    bound = {"bound_op": unswapped.bound_op, "bound_bytes": unswapped.bound_bytes,
             "budget_bytes": budget, "best_bytes": best}
    if unswapped.bound_bytes > budget:
        raise BoundExceededError(
            f"LMS auto-tune: op {unswapped.bound_op} needs "
            f"{format_bytes(unswapped.bound_bytes)} on its own (its inputs and outputs, plus "
            f"weights, optimizer state and gradients), more than the device memory budget of "
            f"{format_bytes(budget)}; no swap plan can fit. Use a smaller input size or batch, "
            f"or a device with more memory.", **bound)
    raise BoundExceededError(
        f"LMS auto-tune: even swapping every eligible tensor (swapout_threshold=0) needs "
        f"{format_bytes(best)}, more than the device memory budget of {format_bytes(budget)} "
        f"(the physical bound is {format_bytes(unswapped.bound_bytes)}, set by op "
        f"{unswapped.bound_op}). Lower min_tensor_bytes, remove include/exclude filters, or "
        f"use a smaller input size or batch.", **bound)
