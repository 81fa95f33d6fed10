"""``lmstrain plan``: what a config needs at a size, and the largest size a budget allows.

:func:`capacity` gathers, for one config, input size and batch: the predicted peaks without
and with swapping (the settings ``lmstrain fit`` would use), the physical bound, the host
memory the swapped tensors need, and, given a device memory budget, the largest size without
and with (auto-tuned) swapping, what stops growth, and the first size where a tensor exceeds
2^31-1 elements. :func:`format_capacity` turns it into the text ``lmstrain plan`` prints.
"""

from collections.abc import Callable

from lmstrain.config import Config
from lmstrain.errors import UserError
from lmstrain.lms.sim.estimate import ELEMENT_LIMIT
from lmstrain.model.unet3d import divisor
from lmstrain.planning.simulate import default_budget, default_executor, simulate_step
from lmstrain.planning.sizing import (MAX_EDGE, candidate_shapes, default_host_memory,
                                      max_size, scaled_shape, voxels)


def capacity(config: Config, size: int | None = None, batch: int | None = None,
             device_memory: int | None = None, host_memory: int | None = None,
             executor: str | None = None,
             progress: Callable[[str], None] | None = None) -> dict:
    """The ``lmstrain plan`` report as a JSON-serialisable dict (see the module docstring).

    ``size`` scales ``config.data.shape`` so its largest edge is ``size``; ``batch`` defaults
    to ``train.batch_size``; ``device_memory`` to ``lms.device_memory`` (or the GPU's);
    ``host_memory`` to :func:`~lmstrain.planning.sizing.default_host_memory` (None: not a limit,
    only reported). ``progress(what)`` is called before each simulated step.
    Raises :class:`UserError` for a size beyond
    :data:`~lmstrain.planning.sizing.MAX_EDGE` or a step beyond what the simulator replays.
    """
    if size and size > MAX_EDGE:
        raise UserError(f"--size {size} is above {MAX_EDGE}, the largest edge lmstrain plans")
    div = divisor(config.model.depth)
    shape = scaled_shape(config.data.shape, size, div) if size else tuple(config.data.shape)
    batch = batch or config.train.batch_size
    budget = default_budget(config, device_memory)
    executor = executor or default_executor()
    host = host_memory or default_host_memory(executor)
    progress = progress or (lambda what: None)
    step = "x".join(map(str, shape))
    progress(f"{step} without swapping")
    without = simulate_step(config, shape, batch, executor=executor, device_memory=budget)
    progress(f"{step} with swapping")
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
        "bound_bytes_with_swap": swapped.bound_bytes, "bound_op_with_swap": swapped.bound_op,
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
    report.update(_limits(config, batch, budget, host, executor, progress))
    return report


def _limits(config, batch, budget, host, executor, progress):
    keys = {f"{k}_{s}_swap": None for k in ("max_size", "max_shape", "max_voxels")
            for s in ("without", "with")}
    keys.update(voxel_ratio=None, limited_by=None, limited_by_without_swap=None,
                max_size_swap_settings=None, max_size_host_bytes=None)
    if not budget:
        return keys
    off = max_size(config, batch, budget, False, executor=executor, host_memory=host,
                   progress=progress)
    on = max_size(config, batch, budget, True, executor=executor, host_memory=host,
                  progress=progress)
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
