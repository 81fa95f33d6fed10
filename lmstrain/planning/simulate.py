"""Predict a training step's device memory for a config, an input size and a batch size.

:func:`simulate_step` builds the configured network at ``shape`` with
:func:`lmstrain.model.training.training_model` (as ``lmstrain fit`` does: dtype policy,
optimizer, loss, metrics) and hands it to the library's simulator
(:mod:`lmstrain.lms.sim.trace`): one training step traced symbolically, with swapping
rewritten by the callback's own pipeline, estimated as a
:class:`~lmstrain.lms.sim.MemoryEstimate`.

Example::

    from lmstrain.config import load_config
    from lmstrain.planning.simulate import simulate_step
    estimate = simulate_step(load_config("configs/demo.yaml"), (48, 48, 48), batch=2)
    estimate.peak_bytes, estimate.bound_bytes, estimate.bound_op
"""

from contextlib import contextmanager

import tensorflow as tf

from lmstrain.config import Config, swap_settings
from lmstrain.errors import UserError
from lmstrain.lms import devices
from lmstrain.lms.errors import LMSParameterError
from lmstrain.lms.settings import SwapSettings
from lmstrain.lms.sim import Choice, MemoryEstimate, Trace
from lmstrain.lms.sim.bfc import OutOfMemory
from lmstrain.lms.sim.estimate import UNLIMITED
from lmstrain.lms.sim.trace import autotune_trace, estimate_trace, trace_train_step
from lmstrain.model.training import training_model
from lmstrain.model.unet3d import N_CHANNELS, N_REGIONS
from lmstrain.units import format_bytes

TRACE_CACHE_SIZE = 6
_TRACES: dict = {}


class BeyondSimulatorError(UserError):
    """A step needs more memory than the simulator's allocator replay can hold (it fits no
    device)."""


@contextmanager
def _replayable(shape, batch):
    """Turn the allocator replay's running out of room into a :class:`BeyondSimulatorError`
    naming the step."""
    try:
        yield
    except OutOfMemory:
        raise BeyondSimulatorError(
            f"{'x'.join(map(str, shape))}, batch {batch}: one training step needs more than "
            f"{format_bytes(UNLIMITED)}, beyond what the simulator replays; choose a smaller "
            "size or batch") from None


def simulate_step(config: Config, shape: tuple[int, ...], batch: int,
                  plan: bool | SwapSettings | None = None, *, executor: str | None = None,
                  device_memory: int | None = None) -> MemoryEstimate:
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
    """
    executor = executor or default_executor()
    budget = device_memory if device_memory is not None else config.lms.device_memory
    with _replayable(shape, batch):
        if plan is None or plan is False:
            result = estimate_trace(cached_trace(config, shape, batch), executor, budget)
        elif plan is True and config.lms.autotune:
            result = autotune_step(config, shape, batch, budget, executor).estimate
        else:
            settings = swap_settings(config) if plan is True else plan
            result = estimate_trace(trace_step(config, shape, batch, settings, executor),
                                    executor, budget)
    result.shape = list(shape)
    return result


def autotune_step(config: Config, shape: tuple[int, ...], batch: int, device_memory: int,
                  executor: str | None = None, retrace: bool = True) -> Choice:
    """Auto-tune ``config.lms``'s settings for ``device_memory`` at ``shape`` and ``batch``.

    The search simulates each candidate plan on one trace; with ``retrace``, the choice's
    estimate is then of the step traced and rewritten with the chosen settings, as the ``LMS``
    callback would (the same plan, the tests check it; on a CPU only the traced rewrite has
    swap nodes for Grappler to order, which places the sends to the host). Raises
    :class:`~lmstrain.lms.errors.BoundExceededError` when no plan fits.
    """
    executor = executor or default_executor()
    if not device_memory:
        raise LMSParameterError(
            "auto-tune needs a device memory budget; got none. Set lms.device_memory (e.g. "
            "16GiB) or pass --device-memory.", key="device_memory")
    with _replayable(shape, batch):
        choice = autotune_trace(cached_trace(config, shape, batch),
                                swap_settings(config), device_memory, executor)
        if retrace:
            choice.estimate = estimate_trace(
                trace_step(config, shape, batch, choice.settings, executor), executor,
                device_memory)
    choice.estimate.shape = list(shape)
    return choice


def estimate_settings(config: Config, shape: tuple[int, ...], batch: int, executor: str,
                      device_memory: int | None, settings: SwapSettings | None) -> MemoryEstimate:
    """The estimate of the cached unswapped trace, with ``settings``' plan added without
    retracing (None: no swapping)."""
    with _replayable(shape, batch):
        result = estimate_trace(cached_trace(config, shape, batch), executor,
                                device_memory, settings)
    result.shape = list(shape)
    return result


def cached_trace(config: Config, shape: tuple[int, ...], batch: int) -> Trace:
    """:func:`trace_step` without swapping, remembered for the last few configs and sizes
    (tracing the paper's network takes seconds; searches ask for the same sizes again)."""
    key = (repr(config.to_dict()), tuple(int(s) for s in shape), batch)
    if key not in _TRACES:
        if len(_TRACES) >= TRACE_CACHE_SIZE:
            del _TRACES[next(iter(_TRACES))]
        _TRACES[key] = trace_step(config, shape, batch)
    return _TRACES[key]


def trace_step(config: Config, shape: tuple[int, ...], batch: int,
               settings: SwapSettings | None = None, executor: str = "cpu",
               copy_mode: str = "snapshot") -> Trace:
    """Build and compile ``config``'s training model at ``shape``; trace one step on
    ``(batch, *shape, 4)`` images and ``(batch, *shape, 3)`` targets, rewritten with
    ``settings`` when given. Nothing runs."""
    shape = tuple(int(s) for s in shape)
    model = training_model(config, shape)
    specs = (tf.TensorSpec((batch, *shape, N_CHANNELS), tf.float32),
             tf.TensorSpec((batch, *shape, N_REGIONS), tf.float32))
    return trace_train_step(model, specs, settings, executor, copy_mode)


def default_executor() -> str:
    """``"gpu"`` when TensorFlow sees a GPU, else ``"cpu"``."""
    return "gpu" if devices.has_gpu() else "cpu"


def default_budget(config: Config, device_memory: int | None = None) -> int | None:
    """The device memory budget: ``device_memory`` if given, else ``lms.device_memory``, else
    the GPU's memory as TensorFlow reports it (None on a CPU)."""
    return device_memory or config.lms.device_memory or devices.default_device_memory()
