"""Multi-worker training (``train.distribute: multi_worker``): the cluster, the strategy, and the
error when a worker is lost.

The cluster comes from ``TF_CONFIG``, or, under Slurm's ``srun`` without ``TF_CONFIG``, from
Slurm's environment (``SlurmClusterResolver``: one worker per task, ports from 8888 on each
node). A worker uses every GPU it sees (choose them with Slurm's ``--gpus-per-task`` or
``CUDA_VISIBLE_DEVICES``); without a GPU it computes on /CPU:0. The worker with index 0 (or
the ``chief`` task, when the cluster has one) is the chief: it alone writes the run directory.

A worker that dies stops the others: TensorFlow's coordination service expects a heartbeat
from every worker, and after ``train.worker_timeout`` seconds without one it aborts the
collectives of the others, which then raise :class:`RunError` naming the lost worker.
"""

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass

import tensorflow as tf

from lmstrain.errors import RunError, UserError

SLURM_TASKS = "SLURM_STEP_NUM_TASKS"  # set by srun for every task of a job step
SLURM_PORT_BASE = 8888  # SlurmClusterResolver's: task k of a node listens on 8888 + k
COORDINATED_JOBS = ("chief", "worker")


@dataclass(frozen=True)
class Worker:
    """This process's place in the cluster."""

    index: int  # 0 .. workers - 1, the chief first
    workers: int
    task: str  # TensorFlow's name, e.g. /job:worker/replica:0/task:1
    source: str  # "TF_CONFIG" or "Slurm"

    @property
    def is_chief(self) -> bool:
        return self.index == 0


def in_cluster() -> bool:
    """Whether this process was started as a worker of a cluster (TF_CONFIG, or srun)."""
    return bool(os.environ.get("TF_CONFIG") or os.environ.get(SLURM_TASKS))


def cluster_resolver() -> tf.distribute.cluster_resolver.ClusterResolver:
    """The resolver of this process's cluster: ``TF_CONFIG``, else Slurm's environment.
    Raises :class:`UserError` when there is neither, or ``TF_CONFIG`` is not valid."""
    if os.environ.get("TF_CONFIG"):
        return _tf_config_resolver()
    if in_cluster():
        return _slurm_resolver()
    raise UserError("train.distribute: multi_worker needs a cluster: set TF_CONFIG on every "
                    "worker, run one `lmstrain fit` per task under Slurm's srun, or start local "
                    "workers with `lmstrain fit CONFIG --workers N`")


def _tf_config_resolver():
    try:
        spec = json.loads(os.environ["TF_CONFIG"])
        task = spec["task"]
        jobs = spec["cluster"]
        valid = (task["type"] in COORDINATED_JOBS and isinstance(task["index"], int)
                 and 0 <= task["index"] < len(jobs[task["type"]]))
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise UserError('TF_CONFIG: expected {"cluster": {"worker": ["host:port", ...]}, "task": '
                        '{"type": "worker", "index": I}} with I the index of this worker in the '
                        f"list (\"chief\" also allowed), got {os.environ['TF_CONFIG']!r}")
    return tf.distribute.cluster_resolver.TFConfigClusterResolver()


def _slurm_resolver():
    """Slurm's tasks as workers. TensorFlow's resolver would also hand out GPUs by setting
    CUDA_VISIBLE_DEVICES (and fails on nodes without one); lmstrain leaves that to Slurm."""
    from tensorflow.python.distribute.cluster_resolver.slurm_cluster_resolver import (
        expand_tasks_per_node)

    try:
        per_node = max(expand_tasks_per_node(os.environ["SLURM_STEP_TASKS_PER_NODE"]))
        return tf.distribute.cluster_resolver.SlurmClusterResolver(
            port_base=SLURM_PORT_BASE, gpus_per_node=per_node, gpus_per_task=1,
            auto_set_gpu=False)
    except (KeyError, ValueError, RuntimeError) as err:
        raise UserError(f"cannot read the Slurm job step's tasks from the environment "
                        f"({err}); run `lmstrain fit` under srun, or set TF_CONFIG") from None


def this_worker(resolver) -> Worker:
    """This process's index among the workers (the chief first), their number and its name."""
    spec = resolver.cluster_spec()
    counts = {job: spec.num_tasks(job) if job in spec.jobs else 0 for job in COORDINATED_JOBS}
    task_type, task_id = resolver.task_type, resolver.task_id
    index = task_id + (counts["chief"] if task_type == "worker" else 0)
    source = "TF_CONFIG" if os.environ.get("TF_CONFIG") else "Slurm"
    return Worker(index, sum(counts.values()), f"/job:{task_type}/replica:0/task:{task_id}",
                  source)


class KerasMultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """TensorFlow's MultiWorkerMirroredStrategy, with ``reduce`` as Keras 3 needs it.

    Keras 3.15's ``fit`` calls ``strategy.reduce`` with a nested structure (the first batch,
    before building) and with ``axis=0`` on scalars (the step's loss and metrics), which
    MultiWorkerMirroredStrategy rejects (keras-team/keras#20585). This reduces each value on
    its own, scalars across the replicas as Keras does on one machine.
    """

    def reduce(self, reduce_op, value, axis):
        base = super().reduce

        def one(v):
            scalar = self.experimental_local_results(v)[0].shape.rank == 0
            return base(reduce_op, v, None if scalar else axis)

        return tf.nest.map_structure(one, value)


def make_strategy(resolver, timeout_s: int) -> KerasMultiWorkerStrategy:
    """The multi-worker strategy over ``resolver``'s cluster, a worker counting as lost after
    ``timeout_s`` seconds without a heartbeat. Must come before TensorFlow runs any op."""
    _configure_heartbeat(resolver.cluster_spec(), timeout_s)
    return KerasMultiWorkerStrategy(cluster_resolver=resolver)


def _configure_heartbeat(spec, timeout_s):
    """TensorFlow's coordination service as MultiWorkerMirroredStrategy would configure it,
    with ``timeout_s`` as its heartbeat timeout (no public API sets it)."""
    from tensorflow.python.eager import context

    try:
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    except ImportError:  # older TensorFlow
        from tsl.protobuf import coordination_config_pb2

    jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
            for job in COORDINATED_JOBS if job in spec.jobs]
    leader = "chief" if "chief" in spec.jobs else "worker"
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=f"/job:{leader}/replica:0/task:0",
        heartbeat_timeout_in_ms=timeout_s * 1000, shutdown_barrier_timeout_in_ms=timeout_s * 1000,
        coordinated_jobs=jobs)


TASK_NAME = re.compile(r"/job:(chief|worker)/(?:replica:\d+/)?task:(\d+)")


@contextmanager
def lost_worker_errors(worker: Worker, resolver, timeout_s: int):
    """Turn TensorFlow's error when another worker is lost (collectives aborted after a
    missing heartbeat or a broken connection) into a one-line :class:`RunError` naming it."""
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.AbortedError,
            tf.errors.DeadlineExceededError) as err:
        raise RunError(lost_worker_message(err.message, worker, resolver, timeout_s)) from None


def lost_worker_message(message: str, worker: Worker, resolver, timeout_s: int) -> str:
    """The message for TensorFlow's ``message`` about a lost worker, naming it."""
    spec = resolver.cluster_spec()
    chiefs = spec.num_tasks("chief") if "chief" in spec.jobs else 0
    lost = sorted({int(task) + (chiefs if job == "worker" else 0)
                   for job, task in TASK_NAME.findall(message)} - {worker.index})
    names = " and ".join(f"worker {i} ({_address(spec, i, chiefs)})" for i in lost) \
        or "another worker"
    why = (f"no heartbeat for train.worker_timeout = {timeout_s} s"
           if "heartbeat" in message else "its connection broke")
    return (f"lost {names}: {why}; worker {worker.index} stopped training. Continue from the "
            f"last finished epoch with `lmstrain fit CONFIG --resume RUN_DIR` on every worker")


def _address(spec, index, chiefs):
    job, task = ("chief", index) if index < chiefs else ("worker", index - chiefs)
    return spec.task_address(job, task)
