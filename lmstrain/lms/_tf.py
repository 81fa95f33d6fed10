"""The only place that uses private TensorFlow APIs.

Graph editing (``Operation._update_input``, ``_add_control_input``, ``_id``), the automatic
control dependency skip-list, the eager context's graph collection and function-call options,
Grappler run on a graph outside the runtime, and the device list with memory limits. All are
stable across TF 2.x but undocumented; a TF upgrade should only need this module checked.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.client import device_lib
from tensorflow.python.eager import context
from tensorflow.python.framework import auto_control_deps, meta_graph
from tensorflow.python.grappler import tf_optimizer


def creation_index(op):
    """The order in which ``op`` was added to its graph."""
    return op._id


def replace_input(op, index, tensor):
    """Make input ``index`` of ``op`` read ``tensor`` instead."""
    op._update_input(index, tensor)


def clone_op(op, inputs, name):
    """A new op of ``op``'s type and attributes (placement and colocation aside) reading
    ``inputs``, created in ``op``'s graph under the current name scope and device."""
    attrs = {k: v for k, v in op.node_def.attr.items() if not k.startswith("_")}
    return op.graph._create_op_internal(op.type, list(inputs),
                                        dtypes=[t.dtype for t in op.outputs], name=name,
                                        attrs=attrs)


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


@contextmanager
def without_memory_optimizer() -> Iterator[None]:
    """Inside the block, functions first called from this thread are optimised without
    Grappler's memory optimizer; the thread's function-call options are restored at the end.

    When its estimate of a device's peak exceeds 80% of the device's memory, the optimizer
    turns ``AddN`` ops into running sums whose zero-filled initial value Grappler then folds
    into a constant, held on the device for as long as the function lives. A swapped step
    lands its estimated peak in the backward pass, where the gradient sums are, so the
    rewrite fires there (and on logical CPUs, which report 256 MiB each, at small sizes).
    """
    options = context.context().function_call_options
    before = config_pb2.ConfigProto()
    before.ParseFromString(options.config_proto_serialized)
    config = config_pb2.ConfigProto()
    config.CopyFrom(before)
    config.graph_options.rewrite_options.memory_optimization = (
        rewriter_config_pb2.RewriterConfig.NO_MEM_OPT)
    options.config_proto_serialized = config
    try:
        yield
    finally:
        options.config_proto_serialized = before


def grappler_order(graph: tf.Graph, fetches) -> list[str]:
    """The names of ``graph``'s nodes in the order Grappler's default optimisation leaves
    them (memory optimizer off, as :func:`without_memory_optimizer` runs a swapped step),
    keeping what ``fetches`` (tensors or ops) need."""
    meta = meta_graph.create_meta_graph_def(graph=graph)
    meta.collection_def["train_op"].node_list.value.extend(f.name for f in fetches)
    config = config_pb2.ConfigProto()
    config.graph_options.rewrite_options.memory_optimization = (
        rewriter_config_pb2.RewriterConfig.NO_MEM_OPT)
    return [node.name for node in tf_optimizer.OptimizeGraph(config, meta).node]


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
