"""Device names for LMS, and the CPU-only emulation of a device plus its host.

On a machine without a GPU, :func:`split_cpu` turns the CPU into logical devices: /CPU:0
runs the model (the "device") and /CPU:1 holds swapped tensors (the "host"); with more,
several replicas of a ``tf.distribute`` strategy each get a device and a host
(:func:`replica_hosts`). This exercises the rewrite end to end, but all of them live in the
same RAM, so it saves no memory.
"""

import logging
import os

import tensorflow as tf

from lmstrain.lms import _tf
from lmstrain.lms.errors import LMSParameterError

DEFAULT_HOST_LIMIT_MB = 64 * 1024  # TensorFlow's default TF_GPU_HOST_MEM_LIMIT_IN_MB
HOST_LIMIT_ENV = "TF_GPU_HOST_MEM_LIMIT_IN_MB"

log = logging.getLogger("lmstrain.lms")


def has_gpu() -> bool:
    """True when TensorFlow sees a GPU (the one GPU check of lmstrain)."""
    return bool(tf.config.list_physical_devices("GPU"))


def default_device_memory() -> int | None:
    """The first GPU's memory limit in bytes as TensorFlow reports it; None without a GPU."""
    return memory_limit("/GPU:0") if has_gpu() else None


def split_cpu(count: int = 2) -> bool:
    """Split the CPU into ``count`` logical CPUs before TensorFlow initialises: /CPU:0 plays
    the compute device and /CPU:1 the host, or, for ``count`` replicas of a ``tf.distribute``
    strategy and their hosts, see :func:`replica_hosts`.

    Returns True when at least ``count`` logical CPUs are in effect afterwards (also when they
    already were). Changes nothing and returns False on a machine with a GPU (swaps go to the
    real host), or, with a warning, when TensorFlow's devices are already initialised with
    fewer CPUs.
    """
    if has_gpu():
        return False
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        if len(tf.config.list_logical_devices("CPU")) >= count:
            return True
        log.warning("LMS: cannot split the CPU into %d logical devices: TensorFlow has already "
                    "initialised its devices. Call lmstrain.lms.split_cpu() before creating any "
                    "tensor or model.", count)
        return False
    log.warning("LMS on CPU: %d logical CPUs play devices and hosts. This emulation exercises "
                "the swap rewrite but saves no memory (all are the same RAM).", count)
    return True


def replica_devices(strategy: tf.distribute.Strategy) -> tuple[str, ...]:
    """The compute devices of ``strategy``'s replicas in this process, in replica order; empty
    for TensorFlow's default (no) strategy."""
    try:
        return tuple(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy has no worker devices
        return ()


def replica_hosts(replicas: tuple[str, ...], host_device) -> tuple[str, ...]:
    """The host device of each replica.

    ``host_device``: one device name for every replica, a sequence with one per replica, or
    None: GPU replicas share /CPU:0 (the machine's host memory); replicas on logical CPUs
    (the emulation) get the logical CPUs that no replica computes on, in order, one each.
    """
    if isinstance(host_device, str):
        return (resolve(host_device, "host_device"),) * len(replicas)
    if host_device is not None:
        if len(host_device) != len(replicas):
            raise LMSParameterError(
                f"LMS host_device lists {len(host_device)} devices for {len(replicas)} replicas "
                f"({', '.join(map(short, replicas))}); give one per replica, one for all, or "
                f"None.", key="host_device")
        return tuple(resolve(name, "host_device") for name in host_device)
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    if any(is_gpu(r) for r in replicas):
        return (cpus[0],) * len(replicas)
    free = [c for c in cpus if not any(same(c, r) for r in replicas)]
    if len(free) < len(replicas):
        raise LMSParameterError(
            f"LMS: {len(replicas)} replicas on logical CPUs need {len(replicas)} more logical "
            f"CPUs as their hosts; this process has {len(cpus)}. Call "
            f"lmstrain.lms.split_cpu({2 * len(replicas)}) before TensorFlow starts, or pass "
            f"host_device.", key="host_device")
    return tuple(free[:len(replicas)])


def check_spec(name: str | None, role: str) -> str | None:
    """Check that ``name`` parses as a device name; return it. Does not initialise TF."""
    if name is None:
        return None
    try:
        spec = tf.DeviceSpec.from_string(name) if isinstance(name, str) else None
    except (ValueError, TypeError):
        spec = None
    if spec is None or spec.device_type is None:
        raise LMSParameterError(
            f"LMS {role} must be a device name such as '/CPU:0', '/GPU:0' or "
            f"'/job:localhost/replica:0/task:0/device:CPU:1'; got {name!r}.", key=role)
    return name


def resolve(name: str, role: str) -> str:
    """The fully qualified name of the logical device ``name``; ValueError if there is none."""
    spec = tf.DeviceSpec.from_string(check_spec(name, role))
    wanted = (spec.device_type.upper(), spec.device_index or 0)
    available = tf.config.list_logical_devices()
    for device in available:
        found = tf.DeviceSpec.from_string(device.name)
        if (found.device_type.upper(), found.device_index) == wanted:
            return device.name
    names = ", ".join(short(d.name) for d in available)
    raise LMSParameterError(f"LMS {role} {name!r} is not a device of this process; "
                            f"available: {names}.", key=role)


def default_compute_device():
    """Where unplaced ops run: the first GPU, else the first CPU."""
    gpus = tf.config.list_logical_devices("GPU")
    return (gpus or tf.config.list_logical_devices("CPU"))[0].name


def default_host_device(compute_device):
    """/CPU:1 when the model runs on a CPU that was split by :func:`split_cpu`, else /CPU:0."""
    cpus = tf.config.list_logical_devices("CPU")
    on_cpu = tf.DeviceSpec.from_string(compute_device).device_type.upper() == "CPU"
    if on_cpu and len(cpus) > 1:
        return cpus[1].name
    return cpus[0].name


def is_gpu(name: str) -> bool:
    """True if ``name`` names a GPU."""
    return (tf.DeviceSpec.from_string(name).device_type or "").upper() == "GPU"


def memory_limit(name: str) -> int | None:
    """Bytes TensorFlow may allocate on device ``name`` (a GPU), or None for a CPU."""
    if not is_gpu(name):
        return None
    return _tf.device_memory_limit(short(name))


def host_memory_limit() -> int:
    """The cap of TensorFlow's pinned host allocator: ``TF_GPU_HOST_MEM_LIMIT_IN_MB``, 64 GiB by
    default."""
    return int(os.environ.get(HOST_LIMIT_ENV, DEFAULT_HOST_LIMIT_MB)) * 2**20


def physical_memory() -> int:
    """This machine's RAM in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_memory_environment() -> dict[str, str]:
    """The environment that lets TensorFlow's pinned host allocator (swapped tensors on a GPU
    machine) use all of this machine's RAM instead of its 64 GiB default, unless the variable
    is set already. Must be in effect before TensorFlow starts its GPU devices."""
    if HOST_LIMIT_ENV in os.environ:
        return {}
    return {HOST_LIMIT_ENV: str(physical_memory() // 2**20)}


def runs_on(op, device):
    """True if ``op`` is placed on ``device`` (unplaced ops run on the compute device)."""
    return not op.device or same(op.device, device)


def same(a: str, b: str) -> bool:
    """True if device names ``a`` and ``b`` (short or fully qualified) name one device."""
    a, b = tf.DeviceSpec.from_string(a), tf.DeviceSpec.from_string(b)
    return ((a.device_type or "").upper(), a.device_index or 0) == (
        (b.device_type or "").upper(), b.device_index or 0)


def short(name: str) -> str:
    """'/job:localhost/replica:0/task:0/device:CPU:1' -> '/CPU:1'."""
    spec = tf.DeviceSpec.from_string(name)
    return f"/{spec.device_type}:{spec.device_index or 0}"
