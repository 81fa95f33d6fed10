"""The only place that uses private TensorFlow APIs.

Graph editing (``Operation._update_input``, ``_add_control_input``, ``_id``), the automatic
control dependency skip-list, the eager context's graph collection, and the device list with
memory limits. All are stable across TF 2.x but undocumented; a TF upgrade should only need
this module checked.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import tensorflow as tf
from tensorflow.python.client import device_lib
from tensorflow.python.eager import context
from tensorflow.python.framework import auto_control_deps


def creation_index(op):
    """The order in which ``op`` was added to its graph."""
    return op._id


def replace_input(op, index, tensor):
    """Make input ``index`` of ``op`` read ``tensor`` instead."""
    op._update_input(index, tensor)


def add_control_input(op, control_op):
    """Make ``op`` wait for ``control_op``."""
    op._add_control_input(control_op)


@contextmanager
def order_insensitive(op_type: str) -> Iterator[None]:
    """Inside the block, tf.function does not order stateful ``op_type`` ops among the other
    stateful ops; the process-wide skip-list is restored when the block ends.

    ``DeepCopy`` is stateful; without this, automatic control dependencies chain the swap nodes
    after the optimizer's variable updates and the traced step contains a cycle. The list is
    read when a trace is finalised, so the block must span every trace that adds such ops.
    """
    before = auto_control_deps.SKIPPED_ORDER_INSENSITIVE_STATEFUL_OPS
    auto_control_deps.SKIPPED_ORDER_INSENSITIVE_STATEFUL_OPS = frozenset(before | {op_type})
    try:
        yield
    finally:
        auto_control_deps.SKIPPED_ORDER_INSENSITIVE_STATEFUL_OPS = before


def start_graph_collection():
    """Record the graphs of functions instantiated from now on (see :func:`collect_graphs`)."""
    context.context().enable_graph_collection()


def collect_graphs():
    """A ``RunMetadata`` with the function graphs recorded since the previous call."""
    return context.context().export_run_metadata() or tf.compat.v1.RunMetadata()


def stop_graph_collection():
    context.context().disable_graph_collection()


def device_memory_limit(short_name):
    """The memory limit TensorFlow gave device ``short_name`` (e.g. ``/GPU:0``), or None."""
    wanted = short_name.upper().replace("/", "").replace("DEVICE:", "")
    for device in device_lib.list_local_devices():
        if device.name.upper().replace("/", "").replace("DEVICE:", "") == wanted:
            return device.memory_limit or None
    return None
