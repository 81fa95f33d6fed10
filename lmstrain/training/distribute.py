"""Data-parallel training (``train.distribute``): the replicas' devices and the strategy.

``train.batch_size`` is the batch of each replica, the number ``plan`` and ``maxres`` report
per device; a step trains on ``batch_size x replicas`` volumes and Keras averages the replicas'
gradients, so the learning rate is the one of a single device at the global batch (lmstrain
does not rescale it).
"""

import logging

import tensorflow as tf

from lmstrain.config import local_device
from lmstrain.errors import UserError
from lmstrain.lms import devices

log = logging.getLogger("lmstrain.training.fit")

EMULATED_REPLICAS = 2  # replicas on logical CPUs when a machine without a GPU asks for mirrored


def replica_devices(config) -> list[str]:
    """The replicas' devices (``/GPU:0``, ...); empty for ``train.distribute: none``.

    ``train.devices: null`` means every local GPU, or on a machine without a GPU
    two logical CPUs (the emulation used for testing).
    """
    t = config.train
    if t.distribute == "none":
        return []
    if t.devices is not None:
        return [f"/{kind}:{index}" for kind, index in map(local_device, t.devices)]
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return [f"/GPU:{i}" for i in range(len(gpus))]
    return [f"/CPU:{i}" for i in range(EMULATED_REPLICAS)]


def logical_cpus(config, swapping: bool) -> int:
    """How many logical CPUs a machine without a GPU needs for ``config``: the replicas, the
    configured host device, and, when ``swapping`` without ``lms.host_device``, one host per
    replica (:func:`lmstrain.lms.devices.replica_hosts`)."""
    replicas = replica_devices(config)
    if not replicas:
        return 2 if swapping else 1
    needed = [index + 1 for kind, index in map(local_device, replicas) if kind == "CPU"]
    if swapping:
        host = local_device(config.lms.host_device or "")
        needed.append(host[1] + 1 if host else 2 * len(replicas))
    return max(needed, default=1)


def make_strategy(config) -> tf.distribute.Strategy:
    """TensorFlow's strategy for ``config``: the default (one device) or a MirroredStrategy
    over the replicas' devices. Raises :class:`UserError` naming a missing device."""
    replicas = replica_devices(config)
    if not replicas:
        return tf.distribute.get_strategy()
    present = [d.name for d in tf.config.list_logical_devices()]
    missing = [r for r in replicas if not any(devices.same(r, p) for p in present)]
    if missing:
        raise UserError(f"train.devices: {', '.join(missing)} is not a device of this machine "
                        f"(TensorFlow sees {', '.join(devices.short(p) for p in present)})")
    if config.train.devices is None and not devices.has_gpu():
        log.warning("train.distribute: mirrored on a machine without a GPU: %d replicas on "
                    "logical CPUs (%s), for testing; this gives no speed-up.", len(replicas),
                    ", ".join(replicas))
    return tf.distribute.MirroredStrategy(replicas)


def describe(config, strategy: tf.distribute.Strategy) -> dict:
    """The ``summary.json`` entry: strategy, devices, per-replica and global batch."""
    replicas = strategy.num_replicas_in_sync
    return {"strategy": config.train.distribute, "replicas": replicas,
            "devices": replica_devices(config) or None,
            "batch_size_per_replica": config.train.batch_size,
            "global_batch_size": config.train.batch_size * replicas}
