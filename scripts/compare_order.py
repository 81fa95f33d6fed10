"""Compare TensorFlow's measured op order in one swapped training step with the simulator's.

Trains CONFIG at SIZE^3, batch 1, with swapping, through the trial harness (the setting
``make bench-sim`` measures: deepcopy swaps between two logical CPUs, fresh batches, one
inter-op thread), keeping the profiled step's op order, and emulates the same step with the
simulator's CPU executor order. Prints, measured and emulated:

- the step's op-output peak and the op running at it;
- the step as runs of phases (F forward, B backward, U optimizer update and variable reads);
- how many optimizer-update ops run before the last backward op, and how many convolution
  weight gradients their updates have not yet read at the peak;
- the largest tensors on the device at each peak.

    python scripts/compare_order.py configs/brats2021_isensee.yaml 64 \\
        --set model.norm=instance_lean --set model.split_concat=true
"""

import argparse
import re
import sys
from pathlib import Path

from lmstrain.config import load_config
from lmstrain.lms import SwapSettings
from lmstrain.lms.graph import BACKWARD
from lmstrain.lms.sim.estimate import emulated_timeline
from lmstrain.lms.sim.trace import analysed
from lmstrain.planning import harness
from lmstrain.planning.simulate import trace_step

PHASES = {"forward": "F", "backward": "B"}  # anything else: U
CALL = "StatefulPartitionedCall/"  # the step function's scope in executed op names
TRACE = re.compile(r"/lms/t\d+_")  # a swap scope's trace number (lmstrain.lms.rewrite.swap_scope)


def comparable(name):
    """``name`` without the step function's scope and its swap scope's trace number (the
    simulator plans trace 1; the callback numbers the traces Keras makes)."""
    return TRACE.sub("/lms/t_", name.removeprefix(CALL))


def phase_runs(names, phase, limit):
    """``names`` as runs of phase letters (``F12 B3 U14 ...``), ops unknown to ``phase``
    skipped; at most ``limit`` characters."""
    runs = []
    for name in names:
        if name not in phase:
            continue
        letter = PHASES.get(phase[name], "U")
        if runs and runs[-1][0] == letter:
            runs[-1][1] += 1
        else:
            runs.append([letter, 1])
    text = " ".join(f"{letter}{count}" for letter, count in runs)
    return text if len(text) <= limit else text[:limit] + " ..."


def updates_before_last_backward(names, phase):
    """(update ops before the last backward op, update ops)."""
    known = [phase[n] for n in names if n in phase]
    last = max((i for i, p in enumerate(known) if p == BACKWARD), default=-1)
    updates = [i for i, p in enumerate(known) if p not in PHASES]
    return sum(i < last for i in updates), len(updates)


def held_weight_gradients(names, flow, at):
    """(count, bytes) of the kernels' weight gradients (``Conv3DBackpropFilterV2`` outputs) that
    started before position ``at`` of ``names`` and still have a reader that has not: what
    the optimizer updates have not yet consumed there."""
    position = {name: i for i, name in reversed(list(enumerate(names)))}
    readers = {}
    for node in flow.nodes:
        for tensor in node.inputs:
            readers.setdefault(tensor.rsplit(":", 1)[0], []).append(comparable(node.name))
    count = held = 0
    for node in flow.nodes:
        name = comparable(node.name)
        if node.type != "Conv3DBackpropFilterV2" or position.get(name, at) >= at:
            continue
        if any(position.get(r, len(names)) > at for r in readers.get(node.name, [])):
            count += 1
            held += sum(output.bytes for output in node.outputs)
    return count, held


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("size", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. model.norm=instance_lean (repeatable)")
    parser.add_argument("--recompute", default="none", choices=("none", "cheap", "auto"))
    parser.add_argument("--width", type=int, default=1500, help="characters of phase runs")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)
    shape = (args.size,) * 3
    settings = SwapSettings(recompute=args.recompute)

    trace = trace_step(config, shape, 1, settings, "cpu")
    _, flow = analysed(trace, "cpu")
    timeline = emulated_timeline(flow, "cpu", swapped=True)
    phase = {comparable(node.name): node.phase for node in flow.nodes}

    run = harness.run_trial(harness.request(config.to_dict(), shape, 1,
                                            swap={"recompute": args.recompute},
                                            batches="fresh", op_order=True))
    if run["status"] != "ok":
        sys.exit(f"the trial did not finish: {run['status']}: {run.get('reason', '')}")
    measured = [comparable(name) for name in run["op_order"]]
    emulated = [comparable(name) for name in timeline.order]

    rows = (("measured", measured, run["step_peak_bytes"], comparable(run["peak_at_op"])),
            ("emulated", emulated, timeline.peak_bytes, comparable(timeline.peak_node)))
    for label, names, peak, op in rows:
        before, updates = updates_before_last_backward(names, phase)
        count, held = held_weight_gradients(names, flow, names.index(op) if op in names
                                            else len(names))
        print(f"{label}: step op-output peak {peak / 2**20:.1f} MiB at {op}; "
              f"{before} of {updates} update ops before the last backward op; "
              f"{count} weight gradients ({held / 2**20:.1f} MiB) not yet read by their "
              f"updates at the peak")
        print(f"  {phase_runs(names, phase, args.width)}")
    print("largest buffers on the device at the measured peak (outputs and scratch):")
    for buffer in run["live_at_peak"]:
        print(f"  {buffer['bytes'] / 2**20:8.1f} MiB  {comparable(buffer['op'])}")
    print("largest tensors on the device at the emulated peak:")
    for tensor in timeline.live[:8]:
        print(f"  {tensor.bytes / 2**20:8.1f} MiB  {comparable(tensor.tensor)}")


if __name__ == "__main__":
    main()
