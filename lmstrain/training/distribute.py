"""Data-parallel training (``train.distribute``): the replicas' devices and the strategy.

``mirrored`` runs the replicas in this process; ``multi_worker`` runs one process per worker
(:mod:`lmstrain.training.cluster`), each with its local replicas.
``train.batch_size`` is the batch of each replica, the number ``plan`` and ``maxres`` report
per device; a step trains on ``batch_size x replicas`` volumes and Keras averages the replicas'
gradients, so the learning rate is the one of a single device at the global batch (lmstrain
does not rescale it).
"""

import logging
import math

import tensorflow as tf

from lmstrain.config import local_device
from lmstrain.errors import UserError
from lmstrain.lms import devices
from lmstrain.training import cluster

log = logging.getLogger("lmstrain.training.fit")

EMULATED_REPLICAS = 2  # replicas on logical CPUs when a machine without a GPU asks for mirrored


def replica_devices(config) -> list[str]:
    """This process's replicas' devices (``/GPU:0``, ...); empty for ``train.distribute: none``.

    ``train.devices: null`` means every local GPU, or on a machine without a GPU
    two logical CPUs for mirrored (the emulation used for testing) and /CPU:0 for a worker
    of a multi_worker run.
    """
    t = config.train
    if t.distribute == "none":
        return []
    if t.devices is not None:
        return [f"/{kind}:{index}" for kind, index in map(local_device, t.devices)]
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return [f"/GPU:{i}" for i in range(len(gpus))]
    if t.distribute == "multi_worker":
        return ["/CPU:0"]
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
    """TensorFlow's strategy for ``config``: the default (one device), a MirroredStrategy
    over the replicas' devices, or the multi-worker strategy over the cluster (before
    TensorFlow runs any op). Raises :class:`UserError` naming a missing device or cluster."""
    if config.train.distribute == "multi_worker":
        return cluster.make_strategy(cluster.cluster_resolver(), config.train.worker_timeout)
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


def worker(strategy: tf.distribute.Strategy) -> cluster.Worker | None:
    """This process's place in a multi-worker cluster; None for one process."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    return cluster.this_worker(strategy.cluster_resolver)


def describe(config, strategy: tf.distribute.Strategy) -> dict:
    """The ``summary.json`` entry: strategy, workers, devices (each worker's, for
    multi_worker), per-replica and global batch."""
    replicas = strategy.num_replicas_in_sync
    found = worker(strategy)
    return {"strategy": config.train.distribute, "workers": found.workers if found else 1,
            "replicas": replicas, "devices": replica_devices(config) or None,
            "batch_size_per_replica": config.train.batch_size,
            "global_batch_size": config.train.batch_size * replicas}


def steps_per_epoch(config, train_cases: int, global_batch: int) -> int:
    """Training steps per epoch. One process: ``train.steps_per_epoch``, else enough steps
    to see every training case once (the case stream runs on across epochs). multi_worker:
    the full global batches of one pass, at most ``train.steps_per_epoch``; the remainder
    (``train_cases`` mod ``global_batch``) is dropped, a different one each epoch (see
    :func:`lmstrain.data.pipeline.case_order`), so that no case is seen twice in an epoch
    and every worker runs the same steps. Raises :class:`UserError` with fewer cases than
    one global batch."""
    t = config.train
    if t.distribute != "multi_worker":
        return t.steps_per_epoch or max(1, math.ceil(train_cases / global_batch))
    full = train_cases // global_batch
    if not full:
        raise UserError(f"{train_cases} training cases are fewer than one global batch of "
                        f"{global_batch} (train.batch_size {t.batch_size} x "
                        f"{global_batch // t.batch_size} replicas); use more cases or a "
                        "smaller train.batch_size")
    return min(full, t.steps_per_epoch or full)
