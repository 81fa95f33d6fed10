"""The traced step as the memory simulator sees it: nodes, tensors, aliases and devices.

:func:`build` turns a traced training step (a ``tf.Graph``) into a :class:`Dataflow` that holds
only what costs device or host memory. It applies the rewrites TensorFlow makes before the
step runs and that change memory:

- constant folding: ops computed from constants only (shape arithmetic) become constants
  (``StepGraph.folded``);
- common-subexpression elimination: identical ops on identical inputs run once (Grappler's
  dedup; e.g. the four region-dice metrics share one ``y_pred > 0.5``);
- ``Identity`` and ``IdentityN`` ops are removed (Grappler's dependency optimizer), so the
  optimizer's update of each weight does not wait for the ``IdentityN`` of all gradients;
- dead code (ops no stateful op and no step output depends on) is dropped.

The step's inputs (the batch) count as resident, except those a swap-out reads: TensorFlow
frees an input after its last reader like any buffer, so a swapped input becomes an input
node at the start of the step whose buffer lives until the swap-out and the forward readers
are done (:func:`release_input`).

Each output either owns a new buffer, aliases an input's buffer (``Reshape``, ``Identity``,
``ReadVariableOp`` ...), or may reuse an input buffer the op was the last to read (element-wise
kernels call ``forward_input_or_allocate_output``). Which happens is decided while replaying an
execution order (:mod:`lmstrain.lms.sim.liveness`), because it depends on what is still live.
"""

from dataclasses import dataclass, field

import tensorflow as tf

from lmstrain.lms import devices
from lmstrain.lms.graph import FORWARD, SHAPE_ONLY_TYPES, SWAP_SCOPE

# Outputs that share their first input's buffer (no allocation).
ALIAS_TYPES = frozenset({
    "Identity", "IdentityN", "Reshape", "Squeeze", "ExpandDims", "StopGradient",
    "PreventGradient", "ReadVariableOp", "EnsureShape", "CheckNumerics",
})
# Kernels that write their output into an input buffer when nothing else reads it.
FORWARDING_TYPES = frozenset({
    # unary element-wise (UnaryOp)
    "Abs", "Neg", "Square", "Sqrt", "Rsqrt", "Exp", "Log", "Log1p", "Sigmoid", "Tanh", "Sign",
    "Reciprocal", "Floor", "Ceil", "Round", "LogicalNot", "Softplus", "Erf",
    "Relu", "Relu6", "LeakyRelu", "Elu", "Selu", "ZerosLike", "OnesLike", "Snapshot",
    # binary element-wise (BinaryOp, BinaryElementWiseOp)
    "Add", "AddV2", "Sub", "Mul", "RealDiv", "Div", "DivNoNan", "Maximum", "Minimum",
    "SquaredDifference", "Pow", "FloorMod", "FloorDiv", "LogicalAnd", "LogicalOr",
    "ReluGrad", "Relu6Grad", "LeakyReluGrad", "EluGrad", "SeluGrad", "SigmoidGrad", "TanhGrad",
    "RsqrtGrad", "SqrtGrad", "ReciprocalGrad", "SoftplusGrad",
    "AddN", "BiasAdd", "Select", "SelectV2",
})
# Kernels the CPU executor treats as cheap: run inline, never handed to the thread pool.
CHEAP_TYPES = frozenset({
    "Const", "Placeholder", "NoOp", "VarHandleOp", "Identity", "IdentityN", "StopGradient",
    "Reshape", "Squeeze", "ExpandDims",
}) | SHAPE_ONLY_TYPES


@dataclass
class Output:
    """One output tensor of a node."""

    name: str
    bytes: int
    elements: int
    dtype: str
    alias_of: str = None  # input tensor whose buffer this output shares


@dataclass
class Node:
    """One op that runs during the step."""

    name: str
    type: str
    phase: str
    on_host: bool
    inputs: list  # tensor names this node reads (slots; a tensor read twice appears twice)
    preds: list  # names of nodes it waits for (data and control), distinct
    outputs: list = field(default_factory=list)
    expensive: bool = True
    forwards: bool = False
    flops: int = 0


@dataclass
class Dataflow:
    """The nodes of one step in creation order, and what is resident before it starts."""

    nodes: list
    resident: dict  # category -> bytes on the device for the whole step
    inputs: dict  # step input tensor name -> bytes (resident, counted in ``resident``)
    resident_sizes: list = field(default_factory=list)  # each resident allocation's bytes
    merged: dict = field(default_factory=dict)  # op or tensor name -> the one it was merged into
    function: str = ""
    by_name: dict = field(default_factory=dict)
    producer: dict = field(default_factory=dict)
    input_reads: dict = field(default_factory=dict)  # node name -> resident inputs it reads
    input_types: dict = field(default_factory=dict)  # step input tensor name -> (dtype, elements)
    # node name -> position in the graph Grappler returns (TensorFlow's partitions list nodes
    # in that order); empty when unknown
    positions: dict = field(default_factory=dict)

    def derived(self, nodes):
        """A Dataflow of ``nodes`` with copies of this one's resident state and inputs."""
        return Dataflow(nodes, dict(self.resident), dict(self.inputs),
                        list(self.resident_sizes), dict(self.merged), function=self.function,
                        input_reads=dict(self.input_reads), input_types=dict(self.input_types),
                        positions=dict(self.positions))

    def __post_init__(self):
        self.index()

    def index(self):
        self.by_name = {n.name: n for n in self.nodes}
        self.producer = {o.name: n for n in self.nodes for o in n.outputs}

    def node(self, op_name):
        """The node computing op ``op_name`` (after deduplication), or None if it does not run."""
        return self.by_name.get(self.merged.get(op_name, op_name))

    def tensor(self, name):
        """The name under which tensor ``name`` is simulated (after deduplication)."""
        return self.merged.get(name, name)

    @property
    def flops(self):
        return sum(n.flops for n in self.nodes)

    @property
    def largest_tensor(self):
        """(elements, tensor name) of the largest tensor the step computes."""
        return max(((o.elements, o.name) for n in self.nodes for o in n.outputs),
                   default=(0, None))


def build(step, compute_device, variables=(), cpu_executor=True):
    """The :class:`Dataflow` of ``step``, a :class:`~lmstrain.lms.graph.StepGraph`.

    ``variables`` are the model's, optimizer's and metrics' variables as ``(category, bytes)``
    pairs (resident on the device). Ops placed on another device than ``compute_device`` count
    as host ops. ``cpu_executor`` says which kernels are cheap (on a GPU every kernel is
    launched inline, so none is "expensive").
    """
    constant = step.folded
    canonical = {}  # tensor name -> name of the tensor it is deduplicated into
    merged = {}  # op name -> name of the node it is deduplicated into
    seen = {}
    nodes, inputs, input_types = [], {}, {}
    resident, sizes = {}, [size for _, size in variables]
    for category, size in variables:
        resident[category] = resident.get(category, 0) + size
    for op in step.ops:
        if op not in step.useful:
            continue
        if op in constant or op.type == "Const":
            size = sum(step.tensor_bytes(t) or 0 for t in op.outputs)
            resident["constants"] = resident.get("constants", 0) + size
            sizes.append(size)
            continue
        if op.type == "Placeholder":
            size = step.tensor_bytes(op.outputs[0])
            if op.outputs[0].dtype not in (tf.resource, tf.variant) and size:
                inputs[op.outputs[0].name] = size
                input_types[op.outputs[0].name] = (op.outputs[0].dtype.name,
                                                   _elements(op.outputs[0], step.batch_size))
                resident["inputs"] = resident.get("inputs", 0) + size
                sizes.append(size)
            continue
        if _removed_identity(op, compute_device):
            for out, source in zip(op.outputs, op.inputs):
                canonical[out.name] = canonical.get(source.name, source.name)
            merged[op.name] = canonical_op(op.inputs[0].op, canonical)
            continue
        reads = [canonical.get(t.name, t.name) for t in op.inputs if _simulated(t, constant)]
        key = _dedup_key(op, reads)
        if key is not None and key in seen:
            for mine, theirs in zip(op.outputs, seen[key].outputs):
                canonical[mine.name] = theirs.name
            merged[op.name] = seen[key].name
            continue
        node = _node(op, step, reads, canonical, constant, compute_device, cpu_executor)
        if key is not None:
            seen[key] = node
        nodes.append(node)
    names = {n.name for n in nodes}
    producers = {o.name: n.name for n in nodes for o in n.outputs}
    input_reads = {}
    for node in nodes:
        reads = [t for t in node.inputs if t in inputs]
        if reads:
            input_reads[node.name] = reads
        node.inputs = [t for t in node.inputs if t in producers]
        node.preds = [p for p in dict.fromkeys(node.preds) if p in names and p != node.name]
    flow = Dataflow(nodes, resident, inputs, sizes, {**merged, **canonical},
                    function=step.graph.name, input_reads=input_reads,
                    input_types=input_types)
    swapped = [t for t in inputs
               if any(t in input_reads.get(n.name, ()) for n in nodes if is_swap_out(n.name))]
    for tensor in swapped:
        release_input(flow, tensor)
    if swapped:
        flow.index()
    return flow


def is_swap_out(name):
    """True for the name of a swap-out op (see :func:`lmstrain.lms.rewrite.swap_scope`)."""
    return SWAP_SCOPE in name and name.rsplit("/", 1)[-1] == "swap_out"


def release_input(flow, tensor):
    """Make step input ``tensor`` an ordinary buffer of ``flow`` (edited in place).

    It stops being resident: an input node at the start of the step allocates it, and it is
    freed after its last reader. Returns the input node. Call ``flow.index()`` afterwards.
    """
    size = flow.inputs.pop(tensor)
    flow.resident["inputs"] -= size
    if not flow.resident["inputs"]:
        del flow.resident["inputs"]
    flow.resident_sizes.remove(size)
    dtype, elements = flow.input_types[tensor]
    name = tensor.rsplit(":", 1)[0]
    node = Node(name, "Placeholder", FORWARD, False, [], [], expensive=False)
    node.outputs.append(Output(tensor, size, elements, dtype))
    for reader in flow.nodes:
        reads = flow.input_reads.get(reader.name, ())
        if tensor in reads:
            reader.inputs = reader.inputs + [t for t in reads if t == tensor]
            reader.preds = reader.preds + [name]
    flow.nodes.insert(0, node)
    return node


def _simulated(tensor, constant):
    """True if ``tensor`` is computed during the step (not a constant, resource or variant)."""
    return tensor.op not in constant and tensor.dtype not in (tf.resource, tf.variant)


def _node(op, step, reads, canonical, constant, compute_device, cpu_executor):
    preds = [canonical.get(t.name, t.name).rsplit(":", 1)[0] for t in op.inputs
             if t.op not in constant] + [canonical_op(c, canonical) for c in op.control_inputs
                                         if c not in constant]
    node = Node(name=op.name, type=op.type, phase=step.phase.get(op, FORWARD),
                on_host=not devices.runs_on(op, compute_device), inputs=reads, preds=preds,
                expensive=cpu_executor and op.type not in CHEAP_TYPES,
                forwards=op.type in FORWARDING_TYPES, flops=flops(op, step.batch_size))
    for t in op.outputs:
        size = step.tensor_bytes(t)
        if size is None or t.dtype in (tf.resource, tf.variant):
            size = 0
        alias, elements = None, _elements(t, step.batch_size)
        source = _aliased_input(op, t)
        if source is not None:
            if _simulated(source, constant):
                alias = canonical.get(source.name, source.name)
            else:
                size = elements = 0  # a view of a variable, constant or input: resident
        node.outputs.append(Output(t.name, size, elements, t.dtype.name, alias))
    return node


def _aliased_input(op, output):
    """The input whose buffer ``output`` shares, or None if it gets its own."""
    if op.type == "IdentityN":
        return op.inputs[output.value_index]
    if output.value_index or not op.inputs:
        return None
    if op.type in ALIAS_TYPES or op.type == "Cast" and op.inputs[0].dtype == output.dtype:
        return op.inputs[0]
    return None


def canonical_op(op, canonical):
    """The name of the node that computes ``op``'s first output after deduplication."""
    if op.outputs:
        name = canonical.get(op.outputs[0].name)
        if name is not None:
            return name.rsplit(":", 1)[0]
    return op.name


def _removed_identity(op, compute_device):
    """True for an Identity(N) that Grappler's dependency optimizer removes: no control
    inputs, on the same device as its inputs (consumers then read the inputs directly)."""
    return (op.type in ("Identity", "IdentityN") and op.inputs and not op.control_inputs
            and all(devices.runs_on(t.op, compute_device) == devices.runs_on(op, compute_device)
                    for t in op.inputs))


def _dedup_key(op, reads):
    """Identical ops on identical inputs (Grappler's dedup), or None if ``op`` is unique."""
    if op.op_def.is_stateful or op.type in ("Placeholder", "NoOp") or not op.outputs:
        return None
    attrs = tuple(sorted((k, v.SerializeToString(deterministic=True))
                         for k, v in op.node_def.attr.items() if not k.startswith("_")))
    controls = tuple(sorted(c.name for c in op.control_inputs))
    return (op.type, op.device, tuple(reads), controls, attrs)


def _elements(tensor, batch_size):
    if tensor.shape.rank is None:
        return 0
    n = 1
    for i, d in enumerate(tensor.shape.as_list()):
        n *= batch_size if d is None and i == 0 else (d or 0)
    return n


# Element-wise arithmetic and activations (and their gradients): one operation per output
# element (``AddN``: one per element and extra input).
ELEMENTWISE_TYPES = frozenset({
    "Add", "AddV2", "AddN", "Sub", "Mul", "RealDiv", "DivNoNan", "Neg", "Maximum", "Minimum",
    "Square", "SquaredDifference", "Rsqrt", "Sqrt", "Relu", "Relu6", "LeakyRelu", "Elu", "Selu",
    "Sigmoid", "Tanh", "Softplus", "BiasAdd", "ReluGrad", "Relu6Grad", "LeakyReluGrad",
    "EluGrad", "SigmoidGrad", "TanhGrad", "RsqrtGrad", "SqrtGrad",
})


def flops(op, batch_size=1):
    """Floating-point operations counted for ``op``: a convolution or matrix product (2 per
    multiply-add) or an element-wise op (:data:`ELEMENTWISE_TYPES`).

    ``Conv*D``: output elements x kernel volume x input channels; its two gradients cost the
    same. ``MatMul``: 2 m n k. Reductions, copies and views count 0.
    """
    kind = op.type
    if kind in ELEMENTWISE_TYPES:
        per_element = max(1, len(op.inputs) - 1) if kind == "AddN" else 1
        return per_element * sum(_elements(t, batch_size) for t in op.outputs)
    if kind.startswith("Conv") and kind.endswith(("D", "DV2", "Input", "InputV2", "Filter",
                                                   "FilterV2")):
        kernel, positions = _kernel_shape(op), _conv_output_elements(op, batch_size)
        if kernel is None or positions is None:
            return 0
        volume = 1
        for d in kernel[:-2]:
            volume *= d
        return 2 * positions * kernel[-1] * volume * kernel[-2]
    if kind in ("MatMul", "BatchMatMulV2", "BatchMatMulV3"):
        a, b = op.inputs[0].shape, op.inputs[1].shape
        if not (a.is_fully_defined() and b.is_fully_defined()) or a.rank < 2:
            return 0
        ta = op.get_attr("transpose_a") if kind == "MatMul" else op.get_attr("adj_x")
        m, k = (a[-1], a[-2]) if ta else (a[-2], a[-1])
        tb = op.get_attr("transpose_b") if kind == "MatMul" else op.get_attr("adj_y")
        n = b[-2] if tb else b[-1]
        batch = 1
        for d in a[:-2]:
            batch *= d
        return 2 * batch * m * n * k
    return 0


def _kernel_shape(op):
    """The filter shape (spatial..., in, out) of a convolution op or of its gradient."""
    if op.type.endswith(("Filter", "FilterV2")):
        target = op.outputs[0]
    else:
        target = op.inputs[1]
    shape = target.shape
    return shape.as_list() if shape.is_fully_defined() else None


def _conv_output_elements(op, batch_size):
    """Batch x spatial elements of the forward convolution's output (per output channel)."""
    if op.type.endswith(("Input", "InputV2", "Filter", "FilterV2")):
        grad = op.inputs[2]  # out_backprop
    else:
        grad = op.outputs[0]
    elements = _elements(grad, batch_size)
    channels = grad.shape.as_list()[-1] if grad.shape.rank else None
    return elements // channels if elements and channels else None

