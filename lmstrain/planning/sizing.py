"""The largest input size that trains within a device memory budget, with or without swapping.

At a fixed network and batch, every tensor of the step grows linearly with the number of input
voxels (a level's tensors hold ``voxels / 8**level`` voxels), so the predicted peaks are affine
in the voxel count. :func:`max_size` simulates two small sizes, fits ``peak = a + b * voxels``
for the peak, the bound and the host bytes, and solves for the budget. Extrapolation is only a
starting point: the size it picks is then simulated directly (auto-tuned when swapping), and
the search walks up or down one size at a time until it has a size that fits and the next
larger size that does not. The reported estimate is always the direct simulation.

Traces are cached per size (:func:`~lmstrain.planning.simulate.cached_trace`) and swap plans are
simulated on them without retracing. Sizes keep the configured shape's aspect:
``scaled_shape`` scales it so its largest edge is the size, rounding each edge down to the
network's divisor.
"""

import dataclasses
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

from lmstrain.config import Config, swap_settings
from lmstrain.errors import UserError
from lmstrain.lms import devices
from lmstrain.lms.errors import BoundExceededError
from lmstrain.lms.settings import SwapSettings
from lmstrain.lms.sim import MemoryEstimate
from lmstrain.lms.sim.estimate import ELEMENT_LIMIT
from lmstrain.model.unet3d import divisor
from lmstrain.planning.simulate import (BeyondSimulatorError, autotune_step, default_executor,
                                        estimate_settings, simulate_step)

LIMITS = ("device memory", "single op", "element count", "host memory")
SIZE_RANGE = "size range"  # every candidate fits: the search range, not memory, stops growth
MAX_EDGE = 2048


@dataclass
class SizeLimit:
    """The largest size that fits, and what stops the next one."""

    size: int | None  # largest edge; None when nothing fits
    shape: tuple[int, ...] | None
    voxels: int | None
    limited_by: str  # one of LIMITS, or SIZE_RANGE when every candidate fits
    estimate: MemoryEstimate | None  # at ``shape`` (direct simulation)
    settings: dict | None = None  # the auto-tuned swap settings at ``shape``, when swapping
    next_shape: tuple[int, ...] | None = None  # the next larger candidate, which does not fit
    extrapolated_voxels: int | None = None  # where the affine fit put the limit

    def to_dict(self) -> dict:
        data = asdict(self)
        data["estimate"] = self.estimate.to_dict() if self.estimate else None
        return data


def scaled_shape(base_shape, size, div):
    """``base_shape`` scaled so its largest edge is ``size``; each edge rounded down to a
    multiple of ``div`` (at least ``div``)."""
    largest = max(base_shape)
    return tuple(max(div, int(edge * size / largest) // div * div) for edge in base_shape)


def candidate_shapes(base_shape, div, max_edge=MAX_EDGE):
    """Distinct scaled shapes, smallest first, for largest edges ``div``, ``2 div``, ..."""
    shapes = []
    for size in range(div, max_edge + 1, div):
        shape = scaled_shape(base_shape, size, div)
        if not shapes or shape != shapes[-1]:
            shapes.append(shape)
    return shapes


def voxels(shape):
    n = 1
    for edge in shape:
        n *= edge
    return n


def max_size(config: Config, batch: int, device_memory: int, swap: bool, *,
             executor: str | None = None, host_memory: int | None = None,
             progress: Callable[[str], None] | None = None) -> SizeLimit:
    """The largest size of ``config.data.shape``'s aspect that trains within ``device_memory``.

    ``swap``: False (no swapping) or True (swapping, settings auto-tuned from ``config.lms``
    at each size). ``host_memory``: bytes available for swapped tensors; None =
    :func:`default_host_memory` (which may be None: no limit). ``progress(what)`` is called
    before each step of the search. Returns a :class:`SizeLimit`.
    """
    if not device_memory or device_memory <= 0:
        raise UserError(f"max_size needs a positive device memory budget in bytes; got "
                        f"{device_memory!r}. Pass e.g. --device-memory 16GiB.")
    executor = executor or default_executor()
    host_memory = host_memory or default_host_memory(executor)
    shapes = candidate_shapes(config.data.shape, divisor(config.model.depth))
    progress = progress or (lambda what: None)
    way = "with swapping" if swap else "without swapping"

    def check(shape):
        progress(f"{'x'.join(map(str, shape))} {way}")
        return check_size(config, shape, batch, device_memory, swap, executor, host_memory)

    progress(f"two small sizes {way}, to extrapolate from")
    start, guess = _extrapolated_start(config, batch, device_memory, swap, executor,
                                       host_memory, shapes)
    index = start
    fits, limit, result, settings = check(shapes[index])
    if fits:
        best = (index, result, settings)
        while index + 1 < len(shapes):
            fits, limit, result, settings = check(shapes[index + 1])
            if not fits:
                break
            index += 1
            best = (index, result, settings)
        else:
            limit = SIZE_RANGE
    else:
        best = None
        while index > 0:
            index -= 1
            fits, lower_limit, result, settings = check(shapes[index])
            if fits:
                best = (index, result, settings)
                break
            limit = lower_limit
    if best is None:
        return SizeLimit(None, None, None, limit, None, next_shape=shapes[0],
                         extrapolated_voxels=guess)
    index, result, settings = best
    shape = shapes[index]
    following = shapes[index + 1] if index + 1 < len(shapes) else None
    return SizeLimit(max(shape), shape, voxels(shape), limit, result, settings, following,
                     guess)


def check_size(config: Config, shape: tuple[int, ...], batch: int, device_memory: int,
               swap: bool | SwapSettings, executor: str, host_memory: int | None,
               ) -> tuple[bool, str | None, MemoryEstimate | None, dict | None]:
    """Simulate one size directly: ``(fits, limited_by, estimate, settings)``.

    ``swap``: False, True (settings auto-tuned from ``config.lms`` for the budget), or a
    :class:`~lmstrain.lms.settings.SwapSettings` to simulate as given. ``host_memory`` None
    means no limit. ``limited_by`` is None when it fits, else one of :data:`LIMITS`; a step
    beyond what the simulator replays fits no device memory.
    """
    try:
        if swap is True:
            try:
                choice = autotune_step(config, shape, batch, device_memory, executor,
                                       retrace=False)
            except BoundExceededError as error:
                return False, "single op" if error.single_op else "device memory", None, None
            result, settings = choice.estimate, choice.settings.to_dict()
        else:
            result = simulate_step(config, shape, batch, plan=swap or None, executor=executor,
                                   device_memory=device_memory)
            settings = swap.to_dict() if swap else None
    except BeyondSimulatorError:
        return False, "device memory", None, None
    if result.largest_tensor_elements > ELEMENT_LIMIT:
        return False, "element count", result, settings
    if swap and host_memory is not None and result.host_bytes > host_memory:
        return False, "host memory", result, settings
    if not result.fits(device_memory):
        limit = "single op" if result.bound_bytes > device_memory else "device memory"
        return False, limit, result, settings
    return True, None, result, settings


def _extrapolated_start(config, batch, budget, swap, executor, host_memory, shapes):
    """Index of the largest shape the affine fit predicts to fit, and the predicted voxels."""
    small = [s for s in shapes if min(s) >= 2 * min(shapes[0])][:1] or shapes[:1]
    first = small[0]
    second = next((s for s in shapes if voxels(s) >= 8 * voxels(first)), shapes[-1])
    plan = _most_swapping(config) if swap else None
    a, b = (estimate_settings(config, s, batch, executor, budget, plan) for s in (first, second))
    v1, v2 = voxels(first), voxels(second)
    limits = [_solve(a.peak_bytes, b.peak_bytes, v1, v2, budget),
              ELEMENT_LIMIT * v2 / max(b.largest_tensor_elements, 1)]
    if swap and host_memory is not None:
        limits.append(_solve(a.host_bytes, b.host_bytes, v1, v2, host_memory))
    guess = int(min(limits))
    fitting = [i for i, s in enumerate(shapes) if voxels(s) <= guess]
    return (fitting[-1] if fitting else 0), guess


def _solve(y1, y2, v1, v2, budget):
    """Voxels where the line through (v1, y1) and (v2, y2) reaches ``budget``."""
    if v2 == v1:  # one candidate only: no line, the walk starts at the first size
        return float("inf")
    slope = (y2 - y1) / (v2 - v1)
    if slope <= 0:
        return float("inf")
    return v1 + (budget - y1) / slope


def _most_swapping(config):
    """``config.lms``'s settings with everything eligible swapped and the nearest prefetch."""
    return dataclasses.replace(swap_settings(config), swapout_threshold=0,
                               swapin_ahead=1, swapin_groupby=0)


def default_host_memory(executor: str) -> int | None:
    """Host memory for swapped tensors when ``--host-memory`` is not given, or None when it is
    unknown and not a limit.

    The limit is that of the machine that will train. With a GPU here, it is this machine:
    swapped tensors live in TensorFlow's pinned host allocator, capped by
    ``TF_GPU_HOST_MEM_LIMIT_IN_MB``, which ``lmstrain fit`` raises to this machine's RAM unless
    it is set (``train.prepare_devices``). Without a GPU, the CPU executor's order describes
    this machine (/CPU:1 plays the host, in the same RAM): its RAM. The GPU executor's order
    on a machine without a GPU plans for another machine, whose RAM is unknown: the host
    memory the plan needs is reported, not checked.
    """
    if devices.has_gpu():
        user_set = devices.HOST_LIMIT_ENV in os.environ
        return devices.host_memory_limit() if user_set else devices.physical_memory()
    return devices.physical_memory() if executor == "cpu" else None
