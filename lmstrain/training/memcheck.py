"""Memory checks around ``lmstrain fit``: predicted peak before training, measured after.

Before training, :func:`check` simulates the configured step
(:func:`lmstrain.planning.simulate.simulate_step`)
and compares its predicted peak with the device's memory: ``lms.device_memory`` if set, else
what TensorFlow reports for the GPU. ``lms.enabled: auto`` swaps exactly when the step is
predicted not to fit; on a CPU without ``lms.device_memory`` there is no budget to compare
with, so ``auto`` stays off and says so. After training, :meth:`MemoryCheck.record` puts the
predicted and the measured peak side by side for ``summary.json``.
"""

import logging
import os
from dataclasses import dataclass

import tensorflow as tf

from lmstrain.lms import devices
from lmstrain.lms.sim import MemoryEstimate
from lmstrain.planning.simulate import default_budget, simulate_step
from lmstrain.units import format_bytes

log = logging.getLogger("lmstrain.training.fit")

PREDICTED = ("simulated before training: lmstrain.planning.simulate.simulate_step (traced step, emulated "
             "executor order, BFC allocator model), {executor} executor")


@dataclass
class MemoryCheck:
    """What was predicted before training and what was decided."""

    device: str  # "GPU:0" or "CPU:0"
    budget: int | None  # bytes
    swap: bool
    decision: str
    without_swap: MemoryEstimate | None = None
    with_swap: MemoryEstimate | None = None  # when swapping

    def record(self, measured, how):
        """The ``summary.json`` entry: predicted and measured peaks side by side."""
        predicted = self.with_swap if self.swap else self.without_swap
        return {
            "device": self.device,
            "budget_bytes": self.budget,
            "swapping": self.swap,
            "decision": self.decision,
            "predicted_peak_bytes": predicted.peak_bytes if predicted else None,
            "predicted_peak_bytes_without_swap":
                self.without_swap.peak_bytes if self.without_swap else None,
            "predicted_op_output_peak_bytes": predicted.op_output_peak_bytes if predicted else None,
            "predicted": PREDICTED.format(executor=predicted.executor) if predicted else
            "not predicted (see decision)",
            "measured_peak_bytes": measured,
            "measured": how,
        }


def check(config):
    """Predict the step's peak, compare it with the budget, decide ``lms.enabled: auto``."""
    gpu = devices.has_gpu()
    device = "GPU:0" if gpu else "CPU:0"
    budget = default_budget(config)
    shape, batch = tuple(config.data.shape), config.train.batch_size
    try:
        without = simulate_step(config, shape, batch, device_memory=budget)
    except Exception as error:  # the check is advisory: training goes on without it
        log.warning("Memory prediction failed (%s); training without the check.", error)
        return MemoryCheck(device, budget, config.lms.enabled is True,
                           f"no prediction: {error}")
    swap, decision = _decide(config.lms.enabled, without, budget, gpu)
    if config.train.distribute != "none":
        decision += f" (per device: each replica trains at batch {batch})"
    result = MemoryCheck(device, budget, swap, decision, without)
    if swap:
        result.with_swap = simulate_step(config, shape, batch, plan=True, device_memory=budget)
    (log.warning if decision.startswith("warning") else log.info)("Memory: %s", decision)
    return result


def _decide(enabled, estimate, budget, gpu):
    """(swap?, the reason in one line) for ``lms.enabled`` = ``enabled``."""
    peak = format_bytes(estimate.peak_bytes)
    if budget is None:
        if enabled == "auto":
            return False, (f"predicted peak {peak} without swapping; lms.enabled: auto has no "
                           f"budget to compare with on a CPU (set lms.device_memory), so "
                           f"swapping stays off")
        return bool(enabled), f"predicted peak {peak} without swapping (no device budget known)"
    fits = estimate.fits(budget)
    where = f"{format_bytes(budget)} of {'GPU' if gpu else 'device'} memory"
    if enabled == "auto":
        if fits:
            return False, f"predicted peak {peak} fits in {where}: lms.enabled: auto, no swapping"
        return True, f"predicted peak {peak} exceeds {where}: lms.enabled: auto turns swapping on"
    if not enabled and not fits:
        return False, (f"warning: predicted peak {peak} exceeds {where}; training will likely "
                       f"run out of memory. Set lms.enabled: true (or auto), or reduce "
                       f"data.shape or train.batch_size")
    return bool(enabled), f"predicted peak {peak} without swapping, budget {where}"


def reset_peak(device):
    """Reset the device's allocator peak (a no-op where that is not supported)."""
    try:
        tf.config.experimental.reset_memory_stats(device)
    except (ValueError, tf.errors.OpError):
        pass


def measured_peak(device):
    """(peak bytes since the last reset, how it was measured); (None, why not) when the device's
    allocator does not report it (a CPU without ``TF_CPU_ALLOCATOR_USE_BFC=true``)."""
    why = (f"not measured: tf.config.experimental.get_memory_info('{device}') reports the "
           f"device's allocator only for a GPU, or for a CPU with TF_CPU_ALLOCATOR_USE_BFC=true "
           f"set before TensorFlow starts")
    if "CPU" in device and os.environ.get("TF_CPU_ALLOCATOR_USE_BFC") != "true":
        return None, why
    try:
        peak = tf.config.experimental.get_memory_info(device)["peak"]
    except (ValueError, tf.errors.OpError) as error:
        return None, f"{why} ({error})"
    how = f"measured: tf.config.experimental.get_memory_info('{device}')['peak'] during model.fit"
    if device.startswith("CPU"):
        how += ("; on a CPU split into device and host the allocator is shared, so swapped "
                "copies count too")
    return peak, how
