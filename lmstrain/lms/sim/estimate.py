"""A step's predicted device memory, from its :class:`~lmstrain.lms.sim.dataflow.Dataflow`.

The op-output peak is the largest sum of live op outputs while the emulated executor runs
the step (:mod:`lmstrain.lms.sim.schedule`, :mod:`lmstrain.lms.sim.liveness`), plus what is resident
throughout (weights, optimizer and metric state, constants, the batch).

The allocator peak is what ``get_memory_info()["peak"]`` would report: the same allocations
and frees replayed through a model of TensorFlow's BFC allocator (:mod:`lmstrain.lms.sim.bfc`:
whole chunks, 256-byte rounding, unsplit chunks, regions), over three identical steps after the
resident allocations, plus a calibrated allowance for kernel scratch space, which op outputs do
not show: ``allocator peak = BFC peak + KERNEL_SCRATCH_SHARE x step op-output peak``.
KERNEL_SCRATCH_SHARE was fitted on the demo network only (``scripts/validate_simulator.py``,
``bench/results/simulator_accuracy.json``); held-out cases check it.
"""

import os
from dataclasses import asdict, dataclass, field

from lmstrain.lms.sim import bfc, liveness, schedule, simrewrite
from lmstrain.lms.graph import SWAP_SCOPE

# Fitted on the demo network's calibration cases (bench/results/simulator_accuracy.json).
KERNEL_SCRATCH_SHARE = 0.013
UNLIMITED = 2**50  # allocator limit when only the peak is wanted
ALLOCATOR_STEPS = 3  # steps replayed through the allocator model; the last one is reported
# TensorFlow's CPU device reports 256 MiB of memory to Grappler (device attribute memory_limit).
GRAPPLER_CPU_MEMORY = 256 * 2**20
# Grappler rewrites AddN into running sums when its estimate exceeds this share of the device.
GRAPPLER_ADDN_SHARE = 0.8
ELEMENT_LIMIT = 2**31 - 1
EXECUTORS = ("cpu", "gpu")
# oneDNN's graph pass replaces these ops by new nodes on CPU (see schedule.executor_order).
ONEDNN_REWRITTEN = frozenset({
    "Conv2D", "Conv3D", "Conv2DBackpropInput", "Conv2DBackpropFilter", "Conv3DBackpropInputV2",
    "Conv3DBackpropFilterV2", "DepthwiseConv2dNative", "MatMul", "BatchMatMulV2",
    "BatchMatMulV3", "FusedBatchNormV3", "FusedBatchNormGradV3", "MaxPool3D", "MaxPool3DGrad",
    "AvgPool3D", "AvgPool3DGrad", "MaxPool", "MaxPoolGrad", "AvgPool", "AvgPoolGrad",
})


@dataclass
class MemoryEstimate:
    """Predicted memory of one training step. Bytes unless named otherwise."""

    peak_bytes: int  # allocator peak: everything on the device, scratch allowance included
    op_output_peak_bytes: int  # resident + the largest sum of live op outputs
    step_peak_bytes: int  # the op-output peak without the resident part
    resident: dict  # weights, optimizer, metrics, constants, inputs
    breakdown: dict  # what is on the device at the peak, by category
    peak_op: str
    live_at_peak: list  # the largest tensors live at the peak
    bound_bytes: int  # least device memory any swap plan can reach (allocator level)
    bound_op: str  # the op whose inputs and outputs set the bound
    host_bytes: int  # peak of swapped tensors held in host memory
    swapped_bytes: int  # bytes swapped out per step
    swapped_tensors: int
    flops: int  # counted FLOPs of the step (lmstrain.lms.sim.dataflow.flops)
    largest_tensor_elements: int
    largest_tensor: str
    executor: str  # "cpu" or "gpu": which executor order was emulated
    allocator_fits: bool = None  # the allocator model served every request within the budget
    accumulated_addn: list = field(default_factory=list)
    settings: dict = None  # the swap settings, or None without swapping
    shape: list = None
    batch: int = None
    calibration: dict = field(default_factory=dict)
    swapped_in_bytes: int = 0  # bytes swapped back in per step (one copy per swap-in)

    def fits(self, budget):
        """True when the allocator peak is within ``budget`` and no request failed."""
        return self.peak_bytes <= budget and self.allocator_fits is not False

    def to_dict(self):
        return asdict(self)


def estimate(flow, executor="cpu", device_memory=None, weight_bytes=0, plan=None):
    """The :class:`MemoryEstimate` of ``flow`` (built for ``executor``).

    ``device_memory``: the budget Grappler sees on a GPU (decides its AddN rewrite);
    ``weight_bytes``: the trainable weights' bytes (their gradients count towards the bound);
    ``plan``: the :class:`~lmstrain.lms.plan.SwapPlan` already in ``flow``, if any.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}; got {executor!r}")
    timeline = emulated_timeline(flow, executor, swapped=bool(plan and plan.swapped))
    resident = sum(flow.resident.values())
    grappler_memory = GRAPPLER_CPU_MEMORY if executor == "cpu" else device_memory
    accumulated = []  # with a plan, the LMS callback has turned the memory optimizer off
    if (plan is None and grappler_memory
            and resident + timeline.peak_bytes > GRAPPLER_ADDN_SHARE * grappler_memory):
        live = {t.tensor for t in timeline.live}
        accumulated = [n.name for n in simrewrite.addn_candidates(flow)
                       if any(t in live for t in n.inputs)]
        if accumulated:
            flow = simrewrite.accumulate_addn(flow, set(accumulated))
            timeline = emulated_timeline(flow, executor, swapped=False)
    step = timeline.peak_bytes
    allocator, fits = allocator_peak(flow, timeline, executor, device_memory)
    scratch = round(step * KERNEL_SCRATCH_SHARE)
    elements, largest = flow.largest_tensor
    return MemoryEstimate(
        peak_bytes=allocator + scratch,
        op_output_peak_bytes=resident + step,
        step_peak_bytes=step,
        resident=dict(flow.resident),
        breakdown=_breakdown(flow, timeline),
        peak_op=timeline.peak_node,
        live_at_peak=[{"tensor": t.tensor, "op_type": t.op_type, "bytes": t.bytes}
                      for t in timeline.live[:10]],
        bound_bytes=resident + weight_bytes + round(timeline.working_bytes
                                                    * (1 + KERNEL_SCRATCH_SHARE)),
        bound_op=timeline.working_node,
        host_bytes=timeline.host_peak_bytes,
        swapped_bytes=plan.swapped_bytes if plan else 0,
        swapped_tensors=len(plan.swapped) if plan else 0,
        swapped_in_bytes=plan.swapped_in_bytes if plan else 0,
        flops=flow.flops,
        largest_tensor_elements=elements,
        largest_tensor=largest,
        executor=executor,
        allocator_fits=fits,
        accumulated_addn=accumulated,
        settings=plan.settings if plan else None,
        calibration={"kernel_scratch_share": KERNEL_SCRATCH_SHARE,
                     "source": "fitted on the demo network, bench/results/"
                               "simulator_accuracy.json (scripts/validate_simulator.py)"},
    )


def emulated_timeline(flow, executor: str, swapped: bool) -> liveness.Timeline:
    """The replay of ``flow`` in ``executor``'s emulated order; of a ``swapped`` step, the
    higher peak of two orders, the gradient ops' successors in creation order and in reverse:
    a swap plan's edges change the order of the graph Grappler optimises, which TensorFlow's
    executor follows (see :mod:`lmstrain.lms.sim.schedule`). Steps without swapping run in
    creation order, the one their held-out cases validate
    (bench/results/simulator_accuracy.json)."""
    late = ONEDNN_REWRITTEN if executor == "cpu" and onednn_enabled() else frozenset()
    cpu = executor == "cpu"
    return max((liveness.replay(flow, schedule.executor_order(flow, late, cpu, reverse))
                for reverse in ((False, True) if swapped else (False,))),
               key=lambda timeline: timeline.peak_bytes)


def allocator_peak(flow, timeline, executor, device_memory=None):
    """(BFC peak bytes in use on the device, whether it fits ``device_memory``).

    The CPU's allocator grows region by region up to its limit and also holds the host's
    swapped copies (on a CPU split into device and host); a GPU's takes its whole memory limit
    as one region (unless ``TF_FORCE_GPU_ALLOW_GROWTH`` is set) and holds device buffers only.
    With a budget, the device's buffers are replayed with the budget as the limit, so
    fragmentation that would fail a request shows up as ``False``; without one, the second
    value is None.
    """
    device_events = [e for e in timeline.events if e[3]]
    if executor == "cpu":
        growth, events = True, timeline.events
    else:
        growth = os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH", "").lower() == "true"
        events = device_events
    peak = bfc.replay(events, flow.resident_sizes, UNLIMITED, growth, ALLOCATOR_STEPS)
    fits = None
    if device_memory:
        try:
            bfc.replay(device_events, flow.resident_sizes, device_memory, growth,
                       ALLOCATOR_STEPS)
            fits = True
        except bfc.OutOfMemory:
            fits = False
    return peak, fits


def _breakdown(flow, timeline):
    """Bytes on the device at the peak: resident categories, then live tensors by role."""
    parts = dict(flow.resident)
    for tensor in timeline.live:
        if SWAP_SCOPE in tensor.producer:
            role = "swapped in"
        elif tensor.op_type == "Placeholder":
            role = "inputs"  # a swapped step input, before its swap-out
        elif tensor.phase == "forward":
            role = "activations"
        elif tensor.phase == "backward":
            role = "gradients and backward temporaries"
        else:
            role = "optimizer update"
        parts[role] = parts.get(role, 0) + tensor.bytes
    return parts


def onednn_enabled():
    """True when TensorFlow's CPU kernels are oneDNN's (the default on x86 Linux)."""
    return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").lower() not in ("0", "false")
