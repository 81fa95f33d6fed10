"""The swap plan: which tensors go to the host, and when each comes back.

A tensor is a candidate when a forward op on the compute device produces it and a backward op
reads it. It is swapped when it is big enough, passes the type and scope filters, and has
backward consumers more than ``swapout_threshold`` levels after its producer. Those consumers
are grouped (``swapin_groupby`` levels) and each group gets one swap-in, triggered by a backward
op ``swapin_ahead`` levels before the group's first consumer. In ``swapout`` sync mode the
weight reads the forward pass needs next wait for the swap-out, so the original is freed early.

Seven additions to TFLMS's rules cut the peak of U-Nets:

- the step's inputs (the batch) are swapped like activations: the first layer's filter
  gradient reads the image at the very end of the backward pass, so without a swap the batch
  is resident for the whole step;
- long-lived backward tensors are swapped too: a gradient whose consumer runs more than
  ``LONG_LIVED_SHARE`` of the step's levels later (a skip connection's gradient waits from the
  decoder's backward pass until the encoder's) goes to the host and back like an activation;
- a forward tensor whose forward consumer runs far later (a skip connection, read by the
  decoder's concatenation) is swapped in for that consumer too, so it does not occupy (and
  fragment) device memory while the network's deeper levels run;
- forward tensors that update-phase ops read (the metrics read the network's output) get one
  more swap-in, triggered by the end of the backward pass, so that the metrics are computed
  after the backward pass instead of holding their results through it;
- a swap-in is freed before its consumer's siblings allocate: ops that read the consumer's
  other inputs (a convolution's input gradient, sibling of the filter gradient that reads the
  swapped-in activation) wait for the consumer. Without this, TensorFlow's CPU executor runs the
  filter gradients last, holding every swapped-in activation until the end of the step.
- a large backward tensor's small readers run first: a reader that needs nothing but the
  tensor (and weights, constants or shapes) and makes less than it reads (the slice of a
  concatenation's gradient that goes to the skip connection, the sum behind an upsampling's
  gradient) is ordered before the tensor's other readers. Without this, TensorFlow's CPU
  executor runs such a reader when the tensor's chain is long done, holding the whole tensor
  meanwhile (the gradient of the decoder's top concatenation, for most of the backward pass).

- each weight's optimizer update runs as soon as its gradient is there: the update's write
  waits for the backward ops that read the weight (so the variable is written in place, not
  copied) and their consumers wait for the write. Keras gathers every gradient in one
  ``IdentityN`` before the optimizer (the default strategy's all-reduce: an identity, which
  Grappler removes); the plan reads through it. Without this, TensorFlow's CPU executor
  leaves the updates on its thread pool's stack until the backward pass stalls or ends,
  holding the weight gradients and the updates' temporaries meanwhile: the swapped step's
  peak was then at the end of the backward pass (measured: ``bench/results/update_order.json``).

With ``recompute: cheap``, cheap forward tensors whose sources are swapped in anyway are
computed again in the backward pass instead of copied (see :func:`_recompute`).

Swaps keep Grappler's arithmetic rewrites possible, so that training rounds as it does without
swapping: ops in a group of adds (or of one associative op) that Grappler merges get no control
edge (trigger, gate or ``frees_before``), and an op that Grappler merges with its only consumer
is not swapped (see :func:`_arithmetic_groups`).

Plans hold op names only, so they serialise to JSON and outlive the traced graph.
"""

import math
from collections import deque
from dataclasses import asdict, dataclass, field

import tensorflow as tf

from lmstrain.lms import _tf, devices
from lmstrain.lms.errors import SwapCycleError
from lmstrain.lms.graph import BACKWARD, FORWARD, SHAPE_ONLY_TYPES, UPDATE, predecessors
from lmstrain.lms.settings import SYNC_SWAPIN, SYNC_SWAPOUT

# A tensor is long-lived when a consumer runs this share of the step's levels later.
LONG_LIVED_SHARE = 0.03

# Outputs of these ops are variables, constants, captured tensors or aliases: swapping them
# frees nothing. The exception are the placeholders of the step's own arguments, the batch
# (``StepGraph.input_ops``): after function inlining they are the iterator's outputs, a fresh
# buffer each step that TensorFlow frees after its last reader, so a swap-out frees it as soon
# as the first layer has read it (measured: tests/test_lms_inputs.py). Not so between logical
# CPUs with steps_per_execution > 1, where the loop's Optional holds that same buffer all
# step: the LMS callback then empties ``input_ops``. ``IteratorGetNext`` and
# ``OptionalGetValue`` stay excluded: they appear in the outer function, not the traced step.
# ``IdentityN`` is swapped: ``tf.custom_gradient`` returns a layer's output through one (as
# ``Reshape``, a view of an activation that the backward pass reads).
NEVER_SWAPPED_TYPES = frozenset({
    "Const", "Placeholder", "PlaceholderWithDefault", "ReadVariableOp", "VarHandleOp",
    "VariableV2", "Identity", "IteratorGetNext", "OptionalGetValue",
}) | SHAPE_ONLY_TYPES

# Constants, aliases and metadata ops: useless or fragile (folded by Grappler) as triggers.
NEVER_TRIGGER_TYPES = frozenset({
    "Const", "Identity", "IdentityN", "Snapshot", "StopGradient", "Reshape", "Squeeze",
    "ExpandDims", "BroadcastGradientArgs",
}) | SHAPE_ONLY_TYPES

# Producer -> consumer pairs that Grappler's arithmetic optimizer rewrites into ops that round
# differently, as long as the consumer reads the producer directly and is its only data consumer
# (arithmetic_optimizer.cc): trees of adds become one AddN (AddOpsRewriteStage), chains of one
# associative op are reordered (MinimizeBroadcasts), Div(x, Sqrt(y)) becomes Mul(x, Rsqrt(y)),
# Square(Sub(x, y)) SquaredDifference(x, y) and Log(Softmax(x)) LogSoftmax(x). The first four
# (the groups of adds and of associative ops) are also dropped when a member has a control
# input or output. See :func:`_arithmetic_groups`.
ADD_TYPES = frozenset({"Add", "AddV2", "AddN"})
MERGED_PAIRS = (
    (ADD_TYPES, ADD_TYPES), ({"Add"}, {"Add"}), ({"AddV2"}, {"AddV2"}), ({"Mul"}, {"Mul"}),
    ({"Sqrt"}, {"Div", "RealDiv", "Xdivy"}), ({"Sub"}, {"Square"}), ({"Softmax"}, {"Log"}),
)
CONTROL_SENSITIVE_PAIRS = MERGED_PAIRS[:4]
# Ops whose output shares its input's buffer, and ops whose outputs are there from the start
# of the step or cost nothing to compute (weights, constants, shapes).
ALIAS_TYPES = frozenset({"Reshape", "Identity", "Squeeze", "ExpandDims", "Snapshot"})
READY_TYPES = frozenset({"Const", "ReadVariableOp", "VarHandleOp", "ConcatOffset",
                         "BroadcastGradientArgs"}) | SHAPE_ONLY_TYPES
# Element-wise arithmetic that Grappler's arithmetic optimizer may factor or merge.
ARITHMETIC_TYPES = ADD_TYPES | frozenset({"Mul", "Sub", "RealDiv", "Div", "Neg"})
# Ops between a weight's read and the op that uses it (see :func:`_weight_reads`).
WEIGHT_VIEW_TYPES = frozenset({"Cast", "StridedSlice", "Slice", "Reshape", "Identity"})
# Grappler's model pruner removes these between two ops before the arithmetic optimizer runs.
PRUNED_TYPES = frozenset({"Identity", "StopGradient"})
# Cheap, deterministic, stateless ops that ``recompute: cheap`` recomputes instead of swapping
# their outputs: element-wise arithmetic and activations (a normalisation's scale and shift, an
# activation, a residual add), views and repeats (an upsampling); a few operations per element,
# against the hundreds of a convolution's.
RECOMPUTE_TYPES = frozenset({
    "Add", "AddV2", "Sub", "Mul", "RealDiv", "Neg", "Maximum", "Minimum", "Square", "Rsqrt",
    "Sqrt", "Relu", "Relu6", "LeakyRelu", "Elu", "Selu", "Sigmoid", "Tanh", "Softplus",
    "BiasAdd", "Cast", "Reshape", "ExpandDims", "Squeeze", "Tile",
})
# A recomputed tensor's consumers and the swap-in of its source it reads run within this many
# levels of each other (a block's activation, its normalised input and the normalisation's
# input are read within a few levels of each other in the backward pass).
RECOMPUTE_WINDOW = 16
# Most ops a recomputation repeats for one tensor.
RECOMPUTE_MAX_OPS = 12


@dataclass
class SwapIn:
    """One copy back to the compute device, shared by ``consumers``, started after ``trigger``.

    ``frees_before`` holds ``[consumer, op]`` pairs: ``op`` waits for ``consumer``.
    ``after_swap_outs`` names swapped tensors whose swap-outs it waits for (their device
    buffers are freed before it allocates).
    """

    consumers: list[str]
    trigger: list[str]
    name: str = ""
    frees_before: list[list[str]] = field(default_factory=list)
    after_swap_outs: list[str] = field(default_factory=list)


@dataclass
class SwappedTensor:
    tensor: str
    producer: str
    producer_type: str
    shape: list[int | None]
    dtype: str
    bytes: int
    swap_ins: list[SwapIn]
    kept_consumers: list[str] = field(default_factory=list)
    wait_for_swap_out: list[str] = field(default_factory=list)
    swap_out: str = ""


@dataclass
class SkippedTensor:
    tensor: str
    producer: str
    bytes: int | None
    reason: str


@dataclass
class Recompute:
    """A tensor computed again in the backward pass instead of swapped: ``ops`` (forward ops,
    in order) are repeated on the compute device, reading the swap-ins ``sources`` (``[tensor,
    swap-in index]``) where they read those tensors and the original (small or resident)
    tensors elsewhere, after ``trigger`` (the trigger of the swap-in it replaces: without it,
    the executor would recompute as soon as the sources are back, early); ``consumers`` read
    the repeated ``tensor``. ``clones`` names the repeated ops."""

    tensor: str
    producer: str
    producer_type: str
    bytes: int
    ops: list[str]
    sources: list[list]
    consumers: list[str]
    trigger: list[str]
    frees_before: list[list[str]] = field(default_factory=list)
    clones: list[str] = field(default_factory=list)


@dataclass
class SwapPlan:
    """What the rewrite did to one traced function."""

    function: str
    trace: int
    compute_device: str
    host_device: str
    copy_mode: str
    batch_size: int
    batch_size_source: str
    settings: dict
    n_ops: int
    n_levels: int
    replica: int | None = None  # the replica of a tf.distribute strategy; None without one
    swapped: list[SwappedTensor] = field(default_factory=list)
    skipped: list[SkippedTensor] = field(default_factory=list)
    # ``[first, then]`` pairs: ``then`` waits for ``first`` (a large tensor's small readers)
    orderings: list[list[str]] = field(default_factory=list)
    # ``IdentityN`` ops between the gradients and the optimizer, read through (the default
    # strategy's all-reduce, an identity that Grappler removes; see :func:`_update_early`)
    bypassed: list[str] = field(default_factory=list)
    # ``[first, then]`` pairs placing each weight's update between the backward ops that read
    # the weight and their consumers
    updates_first: list[list[str]] = field(default_factory=list)
    recomputed: list[Recompute] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def swapped_bytes(self):
        return sum(s.bytes for s in self.swapped)

    @property
    def swapped_in_bytes(self):
        """Bytes copied back per step: each swapped tensor once per swap-in."""
        return sum(s.bytes * len(s.swap_ins) for s in self.swapped)

    @property
    def swap_nodes(self):
        """Names of every swap-out and swap-in op."""
        return [n for s in self.swapped for n in [s.swap_out] + [i.name for i in s.swap_ins]]

    @property
    def swap_ins(self):
        return [i for s in self.swapped for i in s.swap_ins]

    def totals(self):
        return {
            "swapped_tensors": len(self.swapped),
            "swapped_bytes": self.swapped_bytes,
            "swap_outs": len(self.swapped),
            "swap_ins": len(self.swap_ins),
            "skipped_tensors": len(self.skipped),
            "orderings": len(self.orderings),
            "update_orderings": len(self.updates_first),
            "recomputed_tensors": len(self.recomputed),
            "recomputed_bytes": sum(r.bytes for r in self.recomputed),
            "recompute_ops": sum(len(r.ops) for r in self.recomputed),
        }

    @property
    def label(self):
        """``one_step_on_data (trace 2)``, with ``replica 1 on /CPU:1`` under a strategy."""
        where = "" if self.replica is None else (
            f", replica {self.replica} on {devices.short(self.compute_device)}")
        return f"{self.function} (trace {self.trace}{where})"

    def summary(self):
        """One line for the log, e.g. ``37 tensors swapped, 412.0 MiB/step``."""
        recomputed = (f", {len(self.recomputed)} recomputed instead" if self.recomputed else "")
        return (f"{len(self.swapped)} tensors swapped, {self.swapped_bytes / 2**20:.1f} MiB/step"
                f" ({len(self.swap_ins)} swap-ins, {len(self.skipped)} tensors skipped"
                f"{recomputed})")

    def to_dict(self):
        """JSON-serialisable form (for ``lms_plan.json``)."""
        data = asdict(self)
        data["totals"] = self.totals()
        return data


def make_plan(step, settings, compute_device, host_device, copy_mode, *, function, trace,
              batch_size_source, replica=None):
    """Plan the swaps for ``step`` (a :class:`~lmstrain.lms.graph.StepGraph`)."""
    plan = SwapPlan(function=function, trace=trace, compute_device=compute_device,
                    host_device=host_device, copy_mode=copy_mode, batch_size=step.batch_size,
                    batch_size_source=batch_size_source, settings=settings.to_dict(),
                    n_ops=len(step.ops), n_levels=step.n_levels, replica=replica)
    if not step.has_backward:
        plan.notes.append("no backward pass found (no gradient_tape/ ops): nothing to swap")
        return plan
    forward = [op for op in step.ops if step.phase[op] == FORWARD]
    plan.notes.extend(_unmatched_filters(settings, forward))
    long_lived = max(settings.swapout_threshold, math.ceil(step.n_levels * LONG_LIVED_SHARE))
    members, absorbed = _arithmetic_groups(step)
    end = _end_of_backward(step, compute_device, members)
    for op in step.ops:
        phase = step.phase[op]
        if phase not in (FORWARD, BACKWARD) or (phase == BACKWARD and op not in step.useful):
            continue
        threshold = settings.swapout_threshold if phase == FORWARD else long_lived
        for tensor in op.outputs:
            forward, backward, update = _consumers_by_phase(step, tensor)
            ahead = [c for c in forward if step.level[c] - step.level[op] > long_lived]
            if phase == BACKWARD:
                update = []
                if not _far(step, op, backward, threshold):
                    continue
            if not backward and not ahead:
                continue
            size = step.tensor_bytes(tensor)
            reason = _skip_reason(op, size, settings, compute_device, step)
            if reason is None and op in absorbed:
                reason = (f"{op.type} output that Grappler's arithmetic optimizer merges with "
                          f"its only consumer; a swap would stop that and change the rounding")
            if reason is None:
                reason = _plan_tensor(plan, step, tensor, size, settings, compute_device,
                                      threshold, backward, ahead, update, end, members)
            if reason is not None:
                plan.skipped.append(SkippedTensor(tensor.name, op.name, size, reason))
    _free_before_siblings(step, plan, settings, compute_device, members)
    if settings.recompute == "cheap":
        _recompute(step, plan, settings)
    if plan.swapped:
        _read_early(step, plan, settings, compute_device, members)
        if settings.update_order == "early":
            _update_early(step, plan, settings, compute_device, members)
    _drop_cyclic_pairs(step, plan)
    return plan


def _recompute(step, plan, settings):
    """Replace swap-ins of cheap forward tensors by recomputations (``recompute: cheap``).

    A swapped forward tensor made by ``RECOMPUTE_TYPES`` ops from swapped tensors and small or
    resident ones (:func:`_recompute_segment`) is recomputed for each group of backward
    consumers for which every swapped source has a swap-in whose consumers run within
    ``RECOMPUTE_WINDOW`` levels; that swap-in is then triggered no later than the group's own
    (so the sources are back when the recomputation runs). A tensor whose swap-ins are all
    replaced is not swapped out at all. Tensors are visited in creation order, so a block's
    activation, whose normalised input is recomputed, is recomputed from the normalisation's
    input through both.
    """
    graph = step.graph
    swapped = {s.tensor: s for s in plan.swapped}
    for entry in list(plan.swapped):
        producer = graph.get_operation_by_name(entry.producer)
        if (step.phase[producer] != FORWARD or producer.type not in RECOMPUTE_TYPES
                or producer in step.input_ops):
            continue
        segment = _recompute_segment(step, producer, swapped, settings)
        if segment is None:
            continue
        ops, sources = segment
        kept = []
        for swap_in in entry.swap_ins:
            serving = _serving_swap_ins(step, sources, swap_in, swapped)
            if serving is None:
                kept.append(swap_in)
                continue
            first = _first_level(step, swap_in)
            for source, index in serving:
                source_in = swapped[source].swap_ins[index]
                if any(step.level[graph.get_operation_by_name(t)] >= first
                       for t in source_in.trigger):
                    source_in.trigger = _with_siblings(step, swap_in.trigger, first)
            plan.recomputed.append(Recompute(
                tensor=entry.tensor, producer=entry.producer, producer_type=entry.producer_type,
                bytes=entry.bytes, ops=[op.name for op in ops],
                sources=[list(s) for s in serving], consumers=list(swap_in.consumers),
                trigger=_inputs_ready(step, swap_in) or list(swap_in.trigger),
                frees_before=list(swap_in.frees_before)))
        if len(kept) < len(entry.swap_ins):
            entry.swap_ins = kept
            if not kept:
                plan.swapped.remove(entry)
                del swapped[entry.tensor]
    _merge_into_serving(step, plan)
    _after_trigger_swap_outs(step, plan)


def _after_trigger_swap_outs(step, plan):
    """A swap-in serving a recomputation waits for the swap-outs of what its triggers make (a
    concatenation gradient's slice for the skip connection): with the slice still on the
    device, the source and the recomputed tensor would be held beside it."""
    swapped = {s.tensor: s for s in plan.swapped}
    for r in plan.recomputed:
        for source, index in r.sources:
            swap_in = swapped[source].swap_ins[index]
            made = [t.name for name in swap_in.trigger
                    for t in step.graph.get_operation_by_name(name).outputs]
            swap_in.after_swap_outs = list(dict.fromkeys(
                swap_in.after_swap_outs + [t for t in made if t in swapped and t != source]))


def _merge_into_serving(step, plan):
    """A source's other backward swap-ins whose consumers run within ``RECOMPUTE_WINDOW``
    levels of a swap-in that serves a recomputation join it: that copy is back on the device
    already (a normalisation's input, read by both halves of the normalisation's gradient,
    comes back once)."""
    serving = {}
    for r in plan.recomputed:
        for source, index in r.sources:
            serving.setdefault(source, set()).add(index)
    for entry in plan.swapped:
        if entry.tensor not in serving:
            continue
        keep = sorted(serving[entry.tensor])
        moved = {}
        for index, swap_in in enumerate(entry.swap_ins):
            if index in keep or not _in_backward(step, swap_in):
                continue
            target = min(keep, key=lambda k: abs(_first_level(step, entry.swap_ins[k])
                                                 - _first_level(step, swap_in)))
            if abs(_first_level(step, entry.swap_ins[target]) - _first_level(step, swap_in)) \
                    <= RECOMPUTE_WINDOW:
                moved[index] = target
        if not moved:
            continue
        for index, target in moved.items():
            joined, swap_in = entry.swap_ins[target], entry.swap_ins[index]
            joined.consumers += [c for c in swap_in.consumers if c not in joined.consumers]
            joined.frees_before += [p for p in swap_in.frees_before
                                    if p not in joined.frees_before]
        remaining = [i for i in range(len(entry.swap_ins)) if i not in moved]
        renumber = {old: new for new, old in enumerate(remaining)}
        entry.swap_ins = [entry.swap_ins[i] for i in remaining]
        for r in plan.recomputed:
            r.sources = [[s, renumber[i]] if s == entry.tensor else [s, i]
                         for s, i in r.sources]


def _recompute_segment(step, producer, swapped, settings):
    """``(ops, sources)``: the forward ops, in creation order, that recompute ``producer``'s
    output from swapped tensors (``sources``, their names) and tensors smaller than
    ``min_tensor_bytes`` or resident (weights, constants); None if there are none such or the
    segment grows past ``RECOMPUTE_MAX_OPS``."""
    ops, sources, queue = {producer}, set(), [producer]
    while queue:
        for t in queue.pop().inputs:
            if t.name in swapped:
                sources.add(t.name)
            elif ((t.op.type in READY_TYPES or t.op in step.folded
                   or (t.op.type == "Placeholder" and t.op not in step.input_ops)
                   or (step.tensor_bytes(t) is not None
                       and step.tensor_bytes(t) < settings.min_tensor_bytes))):
                continue  # resident anyway, or small: read as it is
            elif (t.op.type in RECOMPUTE_TYPES and step.phase.get(t.op) == FORWARD
                  and not t.op.control_inputs):
                if t.op not in ops:
                    ops.add(t.op)
                    queue.append(t.op)
            else:
                return None
        if len(ops) > RECOMPUTE_MAX_OPS:
            return None
    if not sources:
        return None
    return sorted(ops, key=_tf.creation_index), sorted(sources)


def _serving_swap_ins(step, sources, swap_in, swapped):
    """For each source, the index of its swap-in whose consumers run nearest to those of
    ``swap_in`` (within ``RECOMPUTE_WINDOW`` levels); None if a source has none."""
    first = _first_level(step, swap_in)
    chosen = []
    for source in sources:
        distance = [(abs(_first_level(step, i) - first), index)
                    for index, i in enumerate(swapped[source].swap_ins)
                    if _in_backward(step, i)]
        best = min(distance, default=None)
        if best is None or best[0] > RECOMPUTE_WINDOW:
            return None
        chosen.append((source, best[1]))
    return chosen


def _inputs_ready(step, swap_in):
    """The backward ops making the other inputs of ``swap_in``'s first consumers, and the
    other readers of those ops' inputs. A recomputation that waits for them runs just before
    it is read, once the gradient its consumers' inputs were sliced or computed from is
    freed: unlike a copy it needs no lead time, and run earlier it would hold its output
    beside that gradient (a concatenation's gradient and its two slices)."""
    first = _first_level(step, swap_in)
    makers = [t.op.name for name in swap_in.consumers
              for consumer in [step.graph.get_operation_by_name(name)]
              if step.level[consumer] == first for t in consumer.inputs
              if step.phase.get(t.op) == BACKWARD]
    return _with_siblings(step, makers, first)


def _with_siblings(step, names, first):
    """``names`` and the other backward readers of their ops' inputs that run before level
    ``first`` (waiting for them cannot wait for anything at ``first`` or later) and do work
    (an edge from an unused gradient would make it run), triggers only."""
    ops = [step.graph.get_operation_by_name(name) for name in names]
    siblings = [reader for op in ops for t in op.inputs for reader in _consumers(t)
                if step.phase.get(reader) == BACKWARD and reader in step.useful
                and step.level[reader] < first]
    return list(dict.fromkeys(op.name for op in ops + siblings
                              if op.type not in NEVER_TRIGGER_TYPES and op not in step.folded))


def _first_level(step, swap_in):
    """The level of ``swap_in``'s first consumer."""
    return min(step.level[step.graph.get_operation_by_name(n)] for n in swap_in.consumers)


def _in_backward(step, swap_in):
    """True if every consumer of ``swap_in`` is a backward op."""
    return all(step.phase.get(step.graph.get_operation_by_name(n)) == BACKWARD
               for n in swap_in.consumers)


def _far(step, producer, consumers, threshold):
    return any(step.level[c] - step.level[producer] > threshold for c in consumers)


def _consumers_by_phase(step, tensor):
    """(forward, backward, update-phase) consumers of ``tensor`` that do real work."""
    useful = [c for c in _consumers(tensor)
              if c in step.useful and c.type not in SHAPE_ONLY_TYPES]
    return tuple([c for c in useful if step.phase.get(c) == phase]
                 for phase in (FORWARD, BACKWARD, UPDATE))


def _end_of_backward(step, compute_device, members=frozenset()):
    """The backward op with the highest level that can trigger a swap-in, or None."""
    candidates = [op for op in step.ops if step.phase[op] == BACKWARD and op in step.useful
                  and op.type not in NEVER_TRIGGER_TYPES and op not in members
                  and devices.runs_on(op, compute_device)]
    return max(candidates, key=lambda op: (step.level[op], op.name), default=None)


def _consumers(tensor):
    """Distinct consumers of ``tensor`` in a stable order."""
    return list(dict.fromkeys(tensor.consumers()))


def _arithmetic_groups(step):
    """``(members, absorbed)``: ops whose rewrite by Grappler's arithmetic optimizer a swap
    could stop, which would change how the step rounds.

    ``absorbed`` are producers whose only data consumer forms one of ``MERGED_PAIRS`` with
    them: a swap would make that consumer read the swap-in, or give the producer a second
    consumer, so they are not swapped. ``members`` are both ops of each
    ``CONTROL_SENSITIVE_PAIRS`` pair: the optimizer skips a group of adds (or of one
    associative op) if any member has a control input or output (``CanOptimize``,
    ``IsAbsorbableByOptimizedNodesGroup``), so they get no trigger, ``frees_before`` or gate
    edge. Consumers are counted as Grappler counts them after pruning (dead ops, shape reads
    and ``PRUNED_TYPES`` aside); erring towards more members only narrows the choice of
    triggers.
    """
    absorbed, members = set(), set()
    for op in step.ops:
        if op not in step.useful or not any(op.type in a for a, _ in MERGED_PAIRS):
            continue
        consumers = _data_consumers(step, op)
        if len(consumers) != 1:
            continue
        consumer = consumers[0]
        if any(op.type in a and consumer.type in b for a, b in MERGED_PAIRS):
            absorbed.add(op)
        if any(op.type in a and consumer.type in b for a, b in CONTROL_SENSITIVE_PAIRS):
            members.update((op, consumer))
    return members, absorbed


def _data_consumers(step, op):
    """Data consumers of ``op``'s outputs, one per input edge, seen through ``PRUNED_TYPES``."""
    found, queue = [], [c for t in op.outputs for c in t.consumers()]
    while queue:
        consumer = queue.pop()
        if consumer not in step.useful or consumer.type in SHAPE_ONLY_TYPES:
            continue
        if consumer.type in PRUNED_TYPES and not consumer.control_inputs:
            queue.extend(c for t in consumer.outputs for c in t.consumers())
        else:
            found.append(consumer)
    return found


def _skip_reason(op, size, settings, compute_device, step):
    if op in step.folded:
        return "computed from constants only: Grappler folds it into a constant"
    if not devices.runs_on(op, compute_device):
        return f"producer placed on {op.device}, not the compute device"
    if op.type == "Placeholder" and op not in step.input_ops:
        return ("Placeholder output (a captured tensor, or a batch that something outside the "
                "step holds): swapping frees nothing")
    if op.type in NEVER_SWAPPED_TYPES and op not in step.input_ops:
        return f"{op.type} output (variable, constant or alias): swapping frees nothing"
    if op.type in settings.exclude_types:
        return f"op type {op.type} in exclude_types"
    if _in_scopes(op.name, settings.exclude_scopes):
        return "name in exclude_scopes"
    if settings.include_types and op.type not in settings.include_types:
        return f"op type {op.type} not in include_types"
    if settings.include_scopes and not _in_scopes(op.name, settings.include_scopes):
        return "name not in include_scopes"
    if size is None:
        return "size unknown (shape or dtype not static)"
    if size < settings.min_tensor_bytes:
        return f"{size} bytes < min_tensor_bytes {settings.min_tensor_bytes}"
    return None


def _plan_tensor(plan, step, tensor, size, settings, compute_device, threshold, backward,
                 ahead=(), update=(), end=None, members=frozenset()):
    """Add ``tensor`` to ``plan``; return the reason if it cannot be swapped.

    ``backward`` consumers more than ``threshold`` levels away read swap-ins. So do ``ahead``,
    forward consumers far away (a skip connection's concatenation), and ``update``, consumers
    the update phase runs after the backward pass (metrics read the network's output): their
    swap-in waits for ``end``, the end of the backward pass.
    """
    producer = tensor.op
    near = [c for c in backward if step.level[c] - step.level[producer] <= threshold]
    far = [c for c in backward if c not in near]
    if not far and not ahead:
        return (f"every backward consumer is within swapout_threshold="
                f"{settings.swapout_threshold} levels of the producer")
    swap_ins, kept = [], [c.name for c in near]
    for group in (_group_by_level(step, ahead, settings.swapin_groupby) if ahead else []) + \
            (_group_by_level(step, far, settings.swapin_groupby) if far else []):
        trigger = _trigger(step, producer, group[0], settings, compute_device, members)
        if trigger:
            swap_ins.append(SwapIn([c.name for c in group], [t.name for t in trigger]))
        else:
            kept.extend(c.name for c in group)
    if swap_ins and update and end is not None:
        swap_ins.append(SwapIn([c.name for c in update], [end.name]))
    else:
        kept.extend(c.name for c in update)
    if not swap_ins:
        return (f"no op runs at least swapin_ahead={settings.swapin_ahead} levels "
                f"before its consumers to trigger a swap-in")
    waits = []
    if settings.sync_mode in SYNC_SWAPOUT:
        # A step input whose readers are all far (the targets, read by the loss) waits for the
        # network's first layers, as the image does.
        sources = [t for op in step.input_ops for t in op.outputs] if (
            producer in step.input_ops) else [tensor]
        frontier = near if step.phase[producer] == BACKWARD else [
            c for t in sources for c in _consumers(t)
            if step.phase.get(c) == FORWARD and c not in ahead]
        gates = _swap_out_gates(step, tensor, compute_device, frontier, members=members)
        waits = [op.name for op in gates]
        # Small readers of the original run before the gates, or they would hold it (the
        # loss's sum over the targets, which the executor runs after the whole forward pass).
        for reader in frontier:
            if (reader not in gates and reader not in members and _smaller(step, reader, size)
                    and _ready_with(step, reader, {tensor.name}, producer)):
                for gate in gates:
                    _order(plan.orderings, reader, gate)
    plan.swapped.append(SwappedTensor(
        tensor=tensor.name, producer=producer.name, producer_type=producer.type,
        shape=tensor.shape.as_list(), dtype=tensor.dtype.name, bytes=size, swap_ins=swap_ins,
        kept_consumers=kept, wait_for_swap_out=waits))
    return None


def _swap_out_gates(step, tensor, compute_device, frontier=None, max_depth=8,
                    members=frozenset()):
    """Weight reads the pass needs soon after ``tensor``; they wait for its swap-out.

    Gating the consumers themselves would give them control inputs, which stops Grappler from
    fusing or re-associating them (e.g. MatMul+BiasAdd, Add trees) and changes the numbers.
    Variable reads are never rewritten, so gating the reads of the consumers (or, for consumers
    without weights, of their nearest weighted descendants) stalls the pass until the swap-out
    is done without changing any result. ``frontier`` defaults to the forward consumers.
    In the backward pass the weight reads are the forward pass's, done long before; there the
    gates are the nearest consumers themselves that are in no arithmetic group (see
    :func:`_arithmetic_groups`), so the gradient is on the host before the pass goes on.
    """
    phase = step.phase[tensor.op]
    upstream = step.upstream(tensor.op)  # a read the producer needs cannot wait for it
    if frontier is None:
        frontier = [c for c in _consumers(tensor) if step.phase.get(c) == FORWARD]
    gates, seen = [], set(frontier)
    for _ in range(max_depth):
        for op in frontier:
            for read in _weight_reads(op):
                if (read not in gates and read not in upstream
                        and devices.runs_on(read, compute_device)):
                    gates.append(read)
            if (phase == BACKWARD and op not in gates and op not in members
                    and op.type not in NEVER_TRIGGER_TYPES
                    and devices.runs_on(op, compute_device)):
                gates.append(op)
        if gates:
            return gates
        frontier = [c for op in frontier for t in op.outputs for c in _consumers(t)
                    if step.phase.get(c) == phase and c not in seen]
        seen.update(frontier)
    return gates


def _free_before_siblings(step, plan, settings, compute_device, members=frozenset()):
    """Make the siblings of each swap-in's consumers wait for them (see the module docstring).

    A sibling reads one of the consumer's other inputs (at least ``min_tensor_bytes``, not a
    weight or constant), runs on the compute device in the backward pass, and is not an
    ancestor of the consumer. Pairs with an op of an arithmetic group (see
    :func:`_arithmetic_groups`) are left out; :func:`make_plan` drops pairs that would close a
    cycle.
    """
    graph = step.graph
    consumers = {c for s in plan.swapped for i in s.swap_ins for c in i.consumers}
    for swapped in plan.swapped:
        for swap_in in swapped.swap_ins:
            for name in swap_in.consumers:
                consumer = graph.get_operation_by_name(name)
                if consumer in members:
                    continue
                upstream = step.backward_ancestors(consumer)
                for t in consumer.inputs:
                    if (t.name == swapped.tensor or t.op.type in NEVER_SWAPPED_TYPES
                            or (step.tensor_bytes(t) or 0) < max(settings.min_tensor_bytes, 1)):
                        continue
                    for sibling in _consumers(t):
                        if (sibling is not consumer and sibling.name not in consumers
                                and sibling not in members
                                and step.phase.get(sibling) == BACKWARD
                                and sibling in step.useful and sibling not in upstream
                                and sibling.type not in SHAPE_ONLY_TYPES
                                and devices.runs_on(sibling, compute_device)):
                            pair = [name, sibling.name]
                            if pair not in swap_in.frees_before:
                                swap_in.frees_before.append(pair)


def _drop_cyclic_pairs(step, plan):
    """Remove ``frees_before`` and ``orderings`` pairs on cycles until none is left (other
    cycles are reported by :func:`~lmstrain.lms.rewrite.check_acyclic`)."""
    within = None  # every cycle lies among the ops a topological sort cannot order
    while True:
        cycle, within = _find_cycle(_successors(step, plan), _plan_edges(plan), within)
        if not cycle:
            return
        edges = set(zip(cycle, cycle[1:]))
        dropped = False
        for swap_in in plan.swap_ins:
            kept = [p for p in swap_in.frees_before if tuple(p) not in edges]
            dropped |= len(kept) != len(swap_in.frees_before)
            swap_in.frees_before = kept
        kept = [p for p in plan.orderings if tuple(p) not in edges]
        dropped |= len(kept) != len(plan.orderings)
        plan.orderings = kept
        kept = [p for p in plan.updates_first if tuple(p) not in edges]
        dropped |= len(kept) != len(plan.updates_first)
        plan.updates_first = kept
        if not dropped:
            return


def _read_early(step, plan, settings, compute_device, members=frozenset()):
    """Order the small readers of each large backward tensor before its other readers (see the
    module docstring).

    The ops that wait for a small reader are the tensor's other readers and, when those are
    small readers too, their consumers. A reader qualifies when it runs on the compute device,
    is in no arithmetic group, makes fewer bytes than the tensor or only tensors the plan
    swaps out (a skip connection's gradient, which waits for the encoder; then arithmetic ops,
    which Grappler may still factor, do not wait for it), and each of its
    other inputs is a weight, a constant, a shape or computed before the tensor, so waiting
    for it never waits for anything else; a reader that reads a swap-in of the tensor does
    not. Readers are found through ops whose output aliases the tensor (``ALIAS_TYPES``).
    """
    swapped_in = {(s.tensor, c) for s in plan.swapped for i in s.swap_ins for c in i.consumers}
    swapped = {s.tensor for s in plan.swapped}
    for op in step.ops:
        if (step.phase[op] != BACKWARD or op not in step.useful
                or not devices.runs_on(op, compute_device)):
            continue
        for tensor in op.outputs:
            size = step.tensor_bytes(tensor)
            if not size or size < max(settings.min_tensor_bytes, 1):
                continue
            views, readers = _readers(step, tensor)
            early = [r for r in readers
                     if r not in members and devices.runs_on(r, compute_device)
                     and (_smaller(step, r, size) or all(t.name in swapped for t in r.outputs))
                     and (tensor.name, r.name) not in swapped_in
                     and _ready_with(step, r, views, op)]
            late = [r for r in readers if r not in early and r not in members]
            for first in early:
                after = [c for r in early if r is not first for c in _data_consumers(step, r)
                         if step.phase.get(c) == BACKWARD and c not in members]
                waiting = [op for op in late + after if op.type not in NEVER_TRIGGER_TYPES
                           and (_smaller(step, first, size) or op.type not in ARITHMETIC_TYPES)]
                for then in waiting:
                    _order(plan.orderings, first, then)


def _update_early(step, plan, settings, compute_device, members=frozenset()):
    """Run each weight's optimizer update next to its gradient (see the module docstring).

    A weight's update is the update-phase ops its gradient alone reaches: through data edges,
    through the bypassed ``IdentityN`` (``plan.bypassed``) and from a write of a variable to
    its later uses (TensorFlow orders them once the trace is done). Updates that also read
    another gradient (a global norm, a loss-scale check) are left alone. Each of the
    update's ends (the weight's write) waits for the backward ops that read the weight, so the
    write changes the variable in place instead of copying it; the readers' data consumers
    wait for the end. A weight no backward op reads (a bias, the first layer's kernel) has its
    gradient producer's siblings wait instead.
    """
    barriers = {op for op in step.ops if op.type == "IdentityN" and step.phase[op] == UPDATE
                and not op.control_inputs
                and any(step.phase.get(t.op) == BACKWARD for t in op.inputs)}
    plan.bypassed = sorted(op.name for op in barriers)
    through = {t.name: source for op in barriers for t, source in zip(op.outputs, op.inputs)}

    def sources(op):
        return [through.get(t.name, t).op for t in op.inputs] + list(op.control_inputs)

    def readers(tensor):
        found = []
        for consumer in _consumers(tensor):
            if consumer in barriers:
                index = [t.name for t in consumer.inputs].index(tensor.name)
                found.extend(_consumers(consumer.outputs[index]))
            else:
                found.append(consumer)
        return [c for c in found if step.phase.get(c) == UPDATE and c in step.useful]

    tainted = set()  # update ops that wait for a backward op
    for op in step.ops:
        if step.phase[op] == UPDATE and op not in barriers and any(
                step.phase.get(p) == BACKWARD or p in tainted for p in sources(op)):
            tainted.add(op)
    ends = {}  # gradient producer -> the ends of its weight's update
    for producer in step.ops:
        if (step.phase[producer] != BACKWARD or producer not in step.useful
                or not devices.runs_on(producer, compute_device)):
            continue
        for gradient in producer.outputs:
            update, queue = set(), readers(gradient)
            while queue:
                op = queue.pop()
                if op not in update:
                    update.add(op)
                    queue.extend(c for t in op.outputs for c in readers(t))
                    queue.extend(_later_on_resource(step, op))
            if update and not any(p is not producer and p not in update
                                  and (step.phase.get(p) == BACKWARD or p in tainted)
                                  for op in update for p in sources(op)):
                ends.setdefault(producer, []).extend(sorted(
                    (op for op in update
                     if not any(c in step.useful for t in op.outputs for c in t.consumers())
                     and not _later_on_resource(step, op)), key=lambda op: op.name))
    feeding = set()  # gradient producers and the backward ops they view
    for producer in ends:
        queue = [producer]
        while queue:
            op = queue.pop()
            feeding.add(op)
            if op.type in ALIAS_TYPES:
                queue.extend(t.op for t in op.inputs if step.phase.get(t.op) == BACKWARD)
    weight_readers = {}  # a variable's handle -> the backward ops that read its value
    for op in step.ops:
        if (step.phase[op] == BACKWARD and op in step.useful
                and op.type not in SHAPE_ONLY_TYPES and devices.runs_on(op, compute_device)):
            for read in _weight_reads(op):
                weight_readers.setdefault(read.inputs[0].name, []).append(op)

    def may_wait(op):
        return (op not in members and op not in feeding and step.phase.get(op) == BACKWARD
                and op in step.useful and op.type not in SHAPE_ONLY_TYPES
                and devices.runs_on(op, compute_device))

    for producer, update_ends in ends.items():
        for end in update_ends:
            weight_read = weight_readers.get(end.inputs[0].name, []) if end.inputs else []
            for reader in weight_read:
                _order(plan.updates_first, reader, end)
            waiting = ([c for r in weight_read for c in _data_consumers(step, r)] if weight_read
                       else [s for t in producer.inputs if t.op.type not in NEVER_SWAPPED_TYPES
                             and (step.tensor_bytes(t) or 0) >= max(settings.min_tensor_bytes, 1)
                             for s in _consumers(t) if s is not producer])
            for op in waiting:
                if may_wait(op):
                    _order(plan.updates_first, end, op)


def _later_on_resource(step, op):
    """The update ops that use the variable ``op`` writes and were created after it: they wait
    for it (TensorFlow's automatic control dependencies order a function's uses of one
    resource as created, once its trace is done)."""
    if not op.type.startswith("Assign") or not op.inputs or op.inputs[0].dtype != tf.resource:
        return []
    index = _tf.creation_index(op)
    return [c for c in _consumers(op.inputs[0])
            if step.phase.get(c) == UPDATE and _tf.creation_index(c) > index]


def _order(pairs, first, then):
    """Make ``then`` wait for ``first`` (once): a pair in ``pairs`` (``plan.orderings`` or
    ``plan.updates_first``)."""
    pair = [first.name, then.name]
    if pair not in pairs:
        pairs.append(pair)


def _smaller(step, op, size):
    """True if ``op`` makes fewer bytes than ``size``."""
    return sum(step.tensor_bytes(t) or size for t in op.outputs) < size


def _readers(step, tensor):
    """``(views, readers)``: the names of the tensors that alias ``tensor`` (its own included)
    and the backward ops that read one of them, other than ``ALIAS_TYPES`` and shape reads."""
    views, readers, queue = {tensor.name}, [], [tensor]
    while queue:
        for consumer in _consumers(queue.pop()):
            if (consumer not in step.useful or consumer.type in SHAPE_ONLY_TYPES
                    or step.phase.get(consumer) != BACKWARD):
                continue
            if consumer.type in ALIAS_TYPES and len(consumer.outputs) == 1:
                views.add(consumer.outputs[0].name)
                queue.append(consumer.outputs[0])
            elif consumer not in readers:
                readers.append(consumer)
    return views, readers


def _ready_with(step, reader, views, producer):
    """True if ``reader`` needs nothing but ``views`` and what is there before ``producer``
    (or computed from constants only)."""
    for t in reader.inputs:
        if t.name in views or t.op.type in READY_TYPES or t.op in step.folded:
            continue
        if t.op not in step.upstream(producer):
            return False
    return True


def _weight_reads(op):
    """ReadVariableOp ops feeding ``op`` directly or through ``WEIGHT_VIEW_TYPES`` (a cast,
    or a slice of the kernel as :class:`lmstrain.model.layers.SplitConcatConv3D` takes)."""
    reads = []
    for t in op.inputs:
        source = t.op
        while source.type in WEIGHT_VIEW_TYPES and source.inputs:
            source = source.inputs[0].op
        if source.type == "ReadVariableOp":
            reads.append(source)
    return reads


def _group_by_level(step, consumers, groupby):
    """Split ``consumers`` into runs whose successive levels differ by at most ``groupby``."""
    ordered = sorted(consumers, key=lambda op: (step.level[op], op.name))
    groups = [[ordered[0]]]
    for op in ordered[1:]:
        if step.level[op] - step.level[groups[-1][-1]] <= groupby:
            groups[-1].append(op)
        else:
            groups.append([op])
    return groups


def _trigger(step, producer, consumer, settings, compute_device, members=frozenset()):
    """Ops the swap-in for ``consumer`` waits for, or [] if none qualifies.

    Candidates are ops of the consumer's phase that ``consumer`` depends on and that run
    after ``producer`` (higher level), so the new edges keep the graph acyclic, that do
    real work (Grappler may fold a Reshape away and move its control edges), and that are
    in no group the arithmetic optimizer rewrites (a control output would stop it). In
    ``swapin``/``both`` sync mode they are the consumer's own inputs (swap in at the last
    moment); otherwise the one nearest to ``swapin_ahead`` levels before the consumer.
    """
    floor = step.level[producer]
    candidates = [op for op in step.phase_ancestors(consumer, step.phase[consumer])
                  if step.level[op] > floor and op in step.useful and op not in members
                  and op.type not in NEVER_TRIGGER_TYPES and devices.runs_on(op, compute_device)]
    if settings.sync_mode in SYNC_SWAPIN:
        inputs = set(candidates) & set(predecessors(consumer))
        if inputs:
            return sorted(inputs, key=lambda op: op.name)
    target = step.level[consumer] - settings.swapin_ahead
    eligible = [op for op in candidates if step.level[op] <= target]
    if not eligible:
        return []
    return [min(eligible, key=lambda op: (-step.level[op], op.name))]


def _in_scopes(name, scopes):
    """True if a scope is a run of whole name components of ``name`` (``conv3d_1`` matches
    ``functional_1/conv3d_1/Relu``)."""
    path = f"/{name}/"
    return any(f"/{s.strip('/')}/" in path for s in scopes)


def _unmatched_filters(settings, forward):
    notes = []
    types = {op.type for op in forward}
    missing = [t for t in settings.include_types if t not in types]
    if missing:
        notes.append(f"include_types {missing} match no forward op of this step")
    scopes = [s for s in settings.include_scopes
              if not any(_in_scopes(op.name, [s]) for op in forward)]
    if scopes:
        notes.append(f"include_scopes {scopes} match no forward op of this step")
    return notes


def check_acyclic(step, plan):
    """Raise :class:`SwapCycleError` if the graph with the plan's edges would have a cycle."""
    cycle = find_cycle(step, plan)
    if cycle:
        raise SwapCycleError(
            f"LMS refused to rewrite {plan.label}: the swap plan would "
            f"create a cycle: {' -> '.join(cycle)}. Change swapin_ahead, swapin_groupby or "
            f"sync_mode, or exclude these ops with exclude_scopes.")


def find_cycle(step, plan):
    """A cycle (names, first repeated last) the plan's edges would create, or None."""
    return _find_cycle(_successors(step, plan), _plan_edges(plan))[0]


def _successors(step, plan):
    """The step's successor names, with the plan's bypassed ``IdentityN`` ops taken out."""
    if not plan.bypassed:
        return step.successor_names
    successors = {name: set(names) for name, names in step.successor_names.items()}
    graph = step.graph
    for name in plan.bypassed:
        barrier = graph.get_operation_by_name(name)
        successors[name] = set()
        for t, src in zip(barrier.outputs, barrier.inputs):
            found = successors.setdefault(src.op.name, set())
            found.discard(name)
            found.update(c.name for c in t.consumers())
    return successors


def _plan_edges(plan):
    """The plan's edges between ops and swap nodes: name -> names of its successors."""
    added = {}

    def edge(a, b):
        added.setdefault(a, set()).add(b)

    for s in plan.swapped:
        out = f"<swap-out of {s.tensor}>"
        edge(s.producer, out)
        for name in s.wait_for_swap_out:
            edge(out, name)
        for index, swap_in in enumerate(s.swap_ins):
            back = f"<swap-in {index} of {s.tensor}>"
            edge(out, back)
            for tensor in swap_in.after_swap_outs:
                edge(f"<swap-out of {tensor}>", back)
            for name in swap_in.trigger:
                edge(name, back)
            for name in swap_in.consumers:
                edge(back, name)
            for first, then in swap_in.frees_before:
                edge(first, then)
    for r in plan.recomputed:
        for name in r.consumers:
            for source, index in r.sources:
                edge(f"<swap-in {index} of {source}>", name)
            for trigger in r.trigger:
                edge(trigger, name)
        for first, then in r.frees_before:
            edge(first, then)
    for first, then in plan.orderings + plan.updates_first:
        edge(first, then)
    return added


def _find_cycle(graph, added, within=None):
    """``(cycle, stuck)``: one cycle (a list of names, the first repeated at the end) of the
    edges of ``graph`` and ``added`` (name -> names of its successors), or None, and the
    names a topological sort cannot order (every cycle lies among them). ``within``: look
    only among these names (a ``stuck`` of the same edges or a superset of them)."""
    def successors(n):
        found = (*graph.get(n, ()), *added.get(n, ()))
        return found if within is None else [t for t in found if t in within]

    nodes = set(graph) | set(added) if within is None else within
    indegree = dict.fromkeys(nodes, 0)
    for n in nodes:
        for t in successors(n):
            indegree[t] = indegree.get(t, 0) + 1
    queue = deque(n for n, d in indegree.items() if d == 0)
    while queue:
        for t in successors(queue.popleft()):
            indegree[t] -= 1
            if indegree[t] == 0:
                queue.append(t)
    stuck = {n for n, d in indegree.items() if d > 0}
    if not stuck:
        return None, stuck
    # Every stuck node has a stuck predecessor; walk backwards until a node repeats.
    preds = {n: [] for n in stuck}
    for n in stuck:
        for t in successors(n):
            if t in stuck:
                preds[t].append(n)
    path, seen = [min(stuck)], {}
    while path[-1] not in seen:
        seen[path[-1]] = len(path) - 1
        path.append(min(preds[path[-1]]))
    loop = path[seen[path[-1]]:]
    return list(reversed(loop)), stuck
