"""``lmstrain plan``: what a config needs at a size, and the largest size a budget allows.

:func:`capacity` gathers, for one config, input size and batch: the predicted peaks without
and with swapping (the settings ``lmstrain fit`` would use), the physical bound, the host
memory the swapped tensors need, and, given a device memory budget, the largest size without
and with (auto-tuned) swapping, what stops growth, and the first size where a tensor exceeds
2^31-1 elements. :func:`format_capacity` turns it into the text ``lmstrain plan`` prints.
"""

import tensorflow as tf

from lmstrain.lms import devices
from lmstrain.lms.estimate import ELEMENT_LIMIT
from lmstrain.lms.simulate import default_executor, simulate_step
from lmstrain.lms.sizing import (candidate_shapes, default_host_memory, max_size,
                                 scaled_shape, voxels)
from lmstrain.model.unet3d import divisor
from lmstrain.units import format_bytes


def capacity(config, size=None, batch=None, device_memory=None, host_memory=None,
             executor=None):
    """The ``lmstrain plan`` report as a JSON-serialisable dict (see the module docstring).

    ``size`` scales ``config.data.shape`` so its largest edge is ``size``; ``batch`` defaults
    to ``train.batch_size``; ``device_memory`` to ``lms.device_memory`` (or the GPU's);
    ``host_memory`` to :func:`~lmstrain.lms.sizing.default_host_memory` (None: not a limit,
    only reported).
    """
    div = divisor(config.model.depth)
    shape = scaled_shape(config.data.shape, size, div) if size else tuple(config.data.shape)
    batch = batch or config.train.batch_size
    budget = device_memory or config.lms.device_memory or _gpu_memory()
    executor = executor or default_executor()
    host = host_memory or default_host_memory(executor)
    without = simulate_step(config, shape, batch, executor=executor, device_memory=budget)
    swapped = simulate_step(config, shape, batch, plan=True, executor=executor,
                            device_memory=budget)
    report = {
        "shape": list(shape), "batch": batch, "executor": executor,
        "device_memory_bytes": budget, "host_memory_bytes": host,
        "peak_bytes_without_swap": without.peak_bytes,
        "peak_bytes_with_swap": swapped.peak_bytes,
        "op_output_peak_bytes_without_swap": without.op_output_peak_bytes,
        "op_output_peak_bytes_with_swap": swapped.op_output_peak_bytes,
        "bound_bytes": without.bound_bytes, "bound_op": without.bound_op,
        "host_bytes_with_swap": swapped.host_bytes,
        "swapped_bytes_per_step": swapped.swapped_bytes,
        "swap_settings": swapped.settings,
        "breakdown_without_swap": without.breakdown,
        "breakdown_with_swap": swapped.breakdown,
        "peak_op_without_swap": without.peak_op, "peak_op_with_swap": swapped.peak_op,
        "largest_tensor": without.largest_tensor,
        "largest_tensor_elements": without.largest_tensor_elements,
        "element_limit_size": _element_limit_size(config, without, shape),
        "flops_per_step": without.flops,
    }
    report.update(_limits(config, batch, budget, host, executor))
    return report


def _limits(config, batch, budget, host, executor):
    keys = {f"{k}_{s}_swap": None for k in ("max_size", "max_shape", "max_voxels")
            for s in ("without", "with")}
    keys.update(voxel_ratio=None, limited_by=None, limited_by_without_swap=None,
                max_size_swap_settings=None, max_size_host_bytes=None)
    if not budget:
        return keys
    off = max_size(config, batch, budget, False, executor=executor, host_memory=host)
    on = max_size(config, batch, budget, True, executor=executor, host_memory=host)
    for limit, suffix in ((off, "without"), (on, "with")):
        keys[f"max_size_{suffix}_swap"] = limit.size
        keys[f"max_shape_{suffix}_swap"] = list(limit.shape) if limit.shape else None
        keys[f"max_voxels_{suffix}_swap"] = limit.voxels
    keys.update(limited_by=on.limited_by, limited_by_without_swap=off.limited_by,
                max_size_swap_settings=on.settings,
                max_size_host_bytes=on.estimate.host_bytes if on.estimate else None)
    if off.voxels and on.voxels:
        keys["voxel_ratio"] = on.voxels / off.voxels
    return keys


def _element_limit_size(config, estimate, shape):
    """The first candidate size whose largest tensor exceeds 2^31-1 elements (tensor sizes are
    linear in the voxel count at a fixed network and batch)."""
    per_voxel = estimate.largest_tensor_elements / voxels(shape)
    for candidate in candidate_shapes(config.data.shape, divisor(config.model.depth)):
        if voxels(candidate) * per_voxel > ELEMENT_LIMIT:
            return max(candidate)
    return None


def _gpu_memory():
    """The first GPU's memory limit, or None without a GPU."""
    return devices.memory_limit("/GPU:0") if tf.config.list_physical_devices("GPU") else None


def format_capacity(report, config_name=""):
    """The report as lines of text."""
    r = report
    shape = "x".join(map(str, r["shape"]))
    budget = format_bytes(r["device_memory_bytes"]) if r["device_memory_bytes"] else "unknown"
    host = (format_bytes(r["host_memory_bytes"]) if r["host_memory_bytes"]
            else "not limited (pass --host-memory)")
    lines = [f"{config_name}: input {shape}, batch {r['batch']}; device memory {budget}, host "
             f"memory {host}; {r['executor'].upper()} executor order emulated",
             "",
             f"At {shape}, batch {r['batch']}:{'without swapping':>30}{'with swapping':>18}"]
    parts = dict.fromkeys(list(r["breakdown_without_swap"]) + list(r["breakdown_with_swap"]))
    for part in parts:
        lines.append(f"  {part:<40}{_b(r['breakdown_without_swap'].get(part, 0)):>18}"
                     f"{_b(r['breakdown_with_swap'].get(part, 0)):>18}")
    lines += [
        f"  {'op-output peak':<40}{_b(r['op_output_peak_bytes_without_swap']):>18}"
        f"{_b(r['op_output_peak_bytes_with_swap']):>18}",
        f"  {'allocator peak (predicted)':<40}{_b(r['peak_bytes_without_swap']):>18}"
        f"{_b(r['peak_bytes_with_swap']):>18}",
        f"  peak op without swapping: {r['peak_op_without_swap']}",
        f"  peak op with swapping:    {r['peak_op_with_swap']}",
        f"  swapped per step: {_b(r['swapped_bytes_per_step'])}, held in host memory at most "
        f"{_b(r['host_bytes_with_swap'])}",
        f"  physical bound (weights, optimizer state, gradients, batch and the largest single "
        f"op): {_b(r['bound_bytes'])}, set by {r['bound_op']}",
        f"  largest tensor: {r['largest_tensor']} ({r['largest_tensor_elements']:,} elements); "
        f"tensors exceed 2^31-1 elements from size "
        f"{r['element_limit_size'] or 'beyond the search range'}",
        ""]
    if not r["device_memory_bytes"]:
        lines.append("Largest sizes: pass --device-memory (or set lms.device_memory) to search.")
        return lines
    lines.append(f"Largest size in {budget}:")
    for suffix, label in (("without", "without swapping"), ("with", "with swapping")):
        size = r[f"max_size_{suffix}_swap"]
        limit = r["limited_by_without_swap" if suffix == "without" else "limited_by"]
        if size is None:
            lines.append(f"  {label + ':':<19} nothing fits ({limit})")
            continue
        lines.append(f"  {label + ':':<19} {'x'.join(map(str, r[f'max_shape_{suffix}_swap']))} "
                     f"({r[f'max_voxels_{suffix}_swap']:,} voxels); the next size is stopped by "
                     f"{limit}")
    if r["max_size_swap_settings"]:
        s = r["max_size_swap_settings"]
        lines.append(f"  auto-tuned at that size: swapout_threshold={s['swapout_threshold']}, "
                     f"swapin_ahead={s['swapin_ahead']}, swapin_groupby={s['swapin_groupby']}; "
                     f"host memory needed {_b(r['max_size_host_bytes'])}")
    if r["voxel_ratio"]:
        lines.append(f"  voxel ratio (with / without swapping): {r['voxel_ratio']:.2f}x")
    return lines


def _b(n):
    return format_bytes(n) if n is not None else "-"
