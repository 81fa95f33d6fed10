"""Analysis of one traced training step: phases, topological levels and tensor sizes.

The traced step is one flat graph. Ops created before the first ``gradient_tape/`` op are the
forward pass (model, loss, metrics), ops up to the last ``gradient_tape/`` op are the backward
pass (this range also catches the gradient-summing ``AddN`` ops, which have no scope), the rest
apply the update. Under a ``tf.distribute`` strategy one traced function holds every replica's
step; :meth:`StepGraph.analyse` then takes one replica's ops (those on its device). Levels form
the categorised topological order of TFLMS v2: an op's level is the length of the longest path
reaching it, over data and control edges.
"""

import functools
from collections import deque
from dataclasses import dataclass, field

import tensorflow as tf

from lmstrain.lms import _tf
from lmstrain.lms.devices import same

BACKWARD_SCOPE = "gradient_tape/"
SWAP_SCOPE = "/lms/"  # in the names of swap nodes (see rewrite.swap_scope)
# Grappler does not fold constants larger than this (constant_folding.cc kMaxConstantSize).
MAX_FOLDED_BYTES = 10 * 2**20
SHAPE_ONLY_TYPES = frozenset({"Shape", "ShapeN", "Size", "Rank"})
FORWARD, BACKWARD, UPDATE = "forward", "backward", "update"


@dataclass
class StepGraph:
    """The ops of a traced step with their phase and level, in creation order."""

    graph: tf.Graph
    ops: list
    phase: dict
    level: dict
    useful: set
    batch_size: int
    batch_owned: bool = True
    _ancestors: dict = field(default_factory=dict, repr=False)

    @classmethod
    def analyse(cls, graph: tf.Graph, outputs=(), batch_size: int = 1,
                batch_owned: bool = True, device: str | None = None) -> "StepGraph":
        """Analyse every op of ``graph``; unknown batch dimensions count as ``batch_size``.

        ``outputs`` are the tensors the step returns; together with the stateful ops (variable
        updates) they decide which ops are useful rather than dead code Grappler will prune.
        ``batch_owned``: whether the step alone holds its batch (see :func:`owns_batch`).
        ``device``: analyse only the ops that run there (one replica's, see
        :func:`device_ops`); None = all.
        """
        ops = sorted(graph.get_operations(), key=_tf.creation_index)
        if device is not None:
            ops = device_ops(ops, device)
        roots = [op for op in ops if op.op_def.is_stateful] + [t.op for t in outputs]
        return cls(graph, ops, split_phases(ops), topological_levels(ops), ancestors(roots),
                   batch_size, batch_owned)

    @property
    def has_backward(self):
        return BACKWARD in self.phase.values()

    @property
    def n_levels(self):
        return max(self.level.values(), default=-1) + 1

    def tensor_bytes(self, tensor):
        """Bytes of ``tensor``, or None when a dimension other than the batch is unknown."""
        return tensor_bytes(tensor, self.batch_size)

    @functools.cached_property
    def input_ops(self):
        """The placeholders of the step's data arguments (see :func:`step_inputs`); empty when
        something outside the step holds the batch (``batch_owned`` False: swapping it would
        free nothing)."""
        if not self.batch_owned:
            return frozenset()
        return frozenset(op for op in step_inputs(self.graph) if op in self.phase)

    @functools.cached_property
    def folded(self):
        """Ops Grappler folds into constants: computed from constants only, small outputs."""
        constant = set()
        for op in self.ops:
            if op.type == "Const" or (op.type in SHAPE_ONLY_TYPES
                                      and all(t.shape.is_fully_defined() for t in op.inputs)):
                constant.add(op)
            elif (op.inputs and not op.op_def.is_stateful and op.type != "Placeholder"
                  and all(t.op in constant for t in op.inputs)
                  and all(c in constant for c in op.control_inputs)
                  and all((self.tensor_bytes(t) or 0) <= MAX_FOLDED_BYTES
                          for t in op.outputs)):
                constant.add(op)
        return constant

    @functools.cached_property
    def successor_names(self) -> dict:
        """Each op's name -> the names of the ops that read its outputs or wait for it.
        Cached (the graph must not change in between)."""
        successors = {op.name: set() for op in self.ops}
        for op in self.ops:
            for pred in predecessors(op):
                successors.setdefault(pred.name, set()).add(op.name)
        return successors

    def upstream(self, op):
        """``op`` and every op it depends on, directly or not. Cached (the graph must not
        change in between)."""
        key = (op, None)
        if key not in self._ancestors:
            self._ancestors[key] = ancestors([op])
        return self._ancestors[key]

    def backward_ancestors(self, op):
        """Backward-pass ops that ``op`` depends on, directly or not.

        Forward ops never depend on backward ones, so the search stops at the forward pass.
        """
        return self.phase_ancestors(op, BACKWARD)

    def phase_ancestors(self, op, phase):
        """Ops of ``phase`` that ``op`` depends on through ops of that phase.

        Results are cached (the graph must not change in between).
        """
        key = (op, phase)
        if key in self._ancestors:
            return self._ancestors[key]
        seen, queue = set(), deque([op])
        while queue:
            for pred in predecessors(queue.popleft()):
                if pred not in seen and self.phase.get(pred) == phase:
                    seen.add(pred)
                    queue.append(pred)
        self._ancestors[key] = seen
        return seen


def owns_batch(on_gpu: bool, steps_per_execution: int) -> bool:
    """Whether a traced step alone holds its batch, so that swapping the batch frees it.

    Keras's ``steps_per_execution`` loop fetches the next batch as an Optional that holds it
    for the whole step. On a GPU that is the host's copy, and the device's copy is still freed
    after its swap-out; between logical CPUs both are one buffer.
    """
    return on_gpu or steps_per_execution <= 1


def step_inputs(graph):
    """Placeholders of the traced function's own arguments (the batch), in argument order.

    Captured tensors (variable handles, eager constants) are placeholders too, but their
    buffers belong to the caller and outlive the step; the arguments of Keras's step are
    the outputs of the iterator, a fresh buffer each step that the step alone holds.
    """
    captured = {t.name for t in getattr(graph, "internal_captures", ())}
    return [t.op for t in getattr(graph, "inputs", ())
            if t.op.type == "Placeholder" and t.name not in captured
            and t.dtype not in (tf.resource, tf.variant, tf.string)]


def device_ops(ops, device):
    """The ops of ``ops`` that run on ``device``: those placed there, and unplaced ones (the
    step's arguments, variable reads) whose consumers all run there."""
    consumers = {op: [] for op in ops}
    for op in ops:
        for pred in predecessors(op):
            if pred in consumers:
                consumers[pred].append(op)
    owned = {}

    def runs_there(op):
        if op not in owned:
            owned[op] = False  # guards against revisits; graphs have no cycles
            owned[op] = (same(op.device, device) if op.device else
                         bool(consumers[op]) and all(runs_there(c) for c in consumers[op]))
        return owned[op]

    return [op for op in ops if runs_there(op)]


def ancestors(ops):
    """``ops`` and every op they depend on, directly or not."""
    seen, queue = set(ops), deque(ops)
    while queue:
        for pred in predecessors(queue.popleft()):
            if pred not in seen:
                seen.add(pred)
                queue.append(pred)
    return seen


def predecessors(op):
    """Ops whose outputs or completion ``op`` waits for."""
    return [t.op for t in op.inputs] + list(op.control_inputs)


def split_phases(ops):
    """Map each op to ``forward``, ``backward`` or ``update`` by creation order."""
    backward = [_tf.creation_index(op) for op in ops
                if op.name.startswith(BACKWARD_SCOPE) and SWAP_SCOPE not in op.name]
    if not backward:
        return {op: FORWARD for op in ops}
    first, last = min(backward), max(backward)
    phase = {}
    for op in ops:
        index = _tf.creation_index(op)
        phase[op] = FORWARD if index < first else BACKWARD if index <= last else UPDATE
    return phase


def topological_levels(ops):
    """Longest-path level of each op (0 for ops without inputs), over data and control edges."""
    members = set(ops)
    pending = {op: {p for p in predecessors(op) if p in members} for op in ops}
    successors = {op: set() for op in ops}
    for op, preds in pending.items():
        for pred in preds:
            successors[pred].add(op)
    level = {op: 0 for op in ops if not pending[op]}
    queue = deque(level)
    while queue:
        op = queue.popleft()
        for succ in successors[op]:
            level[succ] = max(level.get(succ, 0), level[op] + 1)
            pending[succ].discard(op)
            if not pending[succ]:
                queue.append(succ)
    if any(pending.values()):
        raise ValueError("the traced step contains a cycle; cannot order its ops")
    return level


def tensor_bytes(tensor, batch_size=1):
    """Bytes of ``tensor``; an unknown first dimension counts as ``batch_size``."""
    if tensor.shape.rank is None or tensor.dtype in (tf.resource, tf.variant, tf.string):
        return None
    dims = tensor.shape.as_list()
    if dims and dims[0] is None:
        dims[0] = batch_size
    if any(d is None for d in dims):
        return None
    n = 1
    for d in dims:
        n *= d
    return n * tensor.dtype.size
