"""Validate the simulator on a Keras model that is not lmstrain's (bench/results/simulator_mobilenetv2.json).

The model is keras.applications.MobileNetV2 (input 96x96x3, alpha 1.0, weights=None, 10
classes), batch 8, compiled with Adam(1e-3) and sparse categorical cross-entropy (no metrics,
jit_compile=False), trained on one resident batch of random images (float32) and labels
(int32), no swapping. It is predicted in this process by lmstrain.lms.sim.estimate_model with
the CPU executor order, and measured in ``--repeats`` fresh subprocesses through the trial
harness (lmstrain.planning.harness: BFC allocator, oneDNN, one inter-op thread, compute
/CPU:0), compared as scripts/validate_simulator.py compares its cases without swapping: the
step op-output peak (profiler replay) and the allocator's step growth (get_memory_info). Also
reported: the activations' share of the predicted op-output peak.

    python scripts/validate_model.py               # 2 repeats
    python scripts/validate_model.py --repeats 3
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import keras
import tensorflow as tf

from lmstrain.lms.sim import estimate_model
from lmstrain.planning import harness

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "simulator_mobilenetv2.json"
SHAPE, BATCH = (96, 96, 3), 8
APPLICATION = {"name": "MobileNetV2",
               "kwargs": {"alpha": 1.0, "weights": None, "classes": 10},
               "loss": "sparse_categorical_crossentropy"}
TARGETS = {"op_output": 0.05, "allocator": 0.10}

MEASURES = {
    "op_output": (
        "step op-output peak: profiler MemoryAllocation/MemoryDeallocation events of one "
        "training step (the 3rd) replayed by address, outputs of ops on the compute device "
        "(requested bytes; Grappler's AddN running sums included); what was resident before "
        "the step (weights, optimizer state, batch) is not in the replay (harness result "
        "step_peak_bytes)"),
    "allocator": (
        "allocator step growth: tf.config.experimental.get_memory_info('CPU:0')['peak'] during "
        "the step minus ['current'] at its start (after reset_memory_stats); includes BFC chunk "
        "rounding and kernel scratch (allocator_peak_bytes - allocator_before_bytes)"),
}
PREDICTED = {
    "op_output": "estimate.step_peak_bytes: the op-output peak without the resident part",
    "allocator": "estimate.peak_bytes - sum(estimate.resident.values()): the BFC allocator "
                 "model's peak (chunk rounding, kernel-scratch allowance) minus the resident "
                 "chunks",
}


def build_model():
    """The compiled model, as the harness builds it for APPLICATION."""
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, APPLICATION["name"])(input_shape=SHAPE,
                                                             **APPLICATION["kwargs"])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=APPLICATION["loss"],
                  jit_compile=False)
    return model


def predict():
    """The simulator's estimate of one training step (CPU executor order, no swapping)."""
    specs = [tf.TensorSpec((BATCH, *SHAPE), tf.float32), tf.TensorSpec((BATCH,), tf.int32)]
    return estimate_model(build_model(), specs, executor="cpu")


def measure():
    """One measurement in a fresh subprocess."""
    run = harness.run_trial(harness.request(None, SHAPE, BATCH, batches="resident",
                                            application=APPLICATION))
    if run["status"] != "ok":
        raise SystemExit(f"{APPLICATION['name']}: {run['status']}: {run['reason']}")
    return run


def compare(key, predicted, measured_values, runs):
    value = statistics.median(measured_values)
    error = predicted / value - 1
    return {"predicted_bytes": predicted, "measured_bytes": value, "error": error,
            "target": TARGETS[key], "within_target": abs(error) <= TARGETS[key],
            "measure": MEASURES[key] + f"; median of {runs} subprocess runs",
            "predicted": PREDICTED[key]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    started = time.time()
    runs = [measure() for _ in range(args.repeats)]
    estimate = predict()
    op_output = compare("op_output", estimate.step_peak_bytes,
                        [r["step_peak_bytes"] for r in runs], len(runs))
    allocator = compare("allocator", estimate.peak_bytes - sum(estimate.resident.values()),
                        [r["allocator_peak_bytes"] - r["allocator_before_bytes"] for r in runs],
                        len(runs))
    activations = estimate.breakdown.get("activations", 0)
    result = {
        "model": f"keras.applications.{APPLICATION['name']}(input_shape={SHAPE}, "
                 + ", ".join(f"{k}={v}" for k, v in APPLICATION["kwargs"].items()) + ")",
        "batch": BATCH, "shape": list(SHAPE), "swap": False, "batches": "resident",
        "compile": "Adam(1e-3), sparse_categorical_crossentropy, no metrics, jit_compile=False",
        "environment": {**harness.MEASURE_ENV, "inter_op_threads": 1, "compute_device": "/CPU:0",
                        "host_device": "/CPU:1", "repeats": args.repeats},
        "predicted": "lmstrain.lms.sim.estimate_model(model, [TensorSpec((8, 96, 96, 3), "
                     "float32), TensorSpec((8,), int32)], executor='cpu'), no swapping",
        "op_output": op_output,
        "allocator": allocator,
        "within_targets": {"op_output": op_output["within_target"],
                           "allocator": allocator["within_target"]},
        "activations_share": {
            "value": activations / estimate.op_output_peak_bytes,
            "activations_bytes": activations,
            "op_output_peak_bytes": estimate.op_output_peak_bytes,
            "definition": "estimate.breakdown['activations'] / estimate.op_output_peak_bytes: "
                          "bytes of forward-pass op outputs live at the predicted op-output "
                          "peak over that peak, resident part (weights, optimizer state, batch) "
                          "included",
            "breakdown_bytes": estimate.breakdown},
        "predicted_peak_op": estimate.peak_op,
        "predicted_total_peak_bytes": estimate.peak_bytes,
        "predicted_resident_bytes": estimate.resident,
        "runs": [{"op_output_bytes": r["step_peak_bytes"],
                  "allocator_bytes": r["allocator_peak_bytes"] - r["allocator_before_bytes"],
                  "allocator_peak_bytes": r["allocator_peak_bytes"],
                  "allocator_before_bytes": r["allocator_before_bytes"],
                  "peak_at_op": r["peak_at_op"], "step_time_s": r["step_time_s"]}
                 for r in runs],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for key in ("op_output", "allocator"):
        r = result[key]
        print(f"{key}: predicted {r['predicted_bytes'] / 2**20:.2f} MiB, measured "
              f"{r['measured_bytes'] / 2**20:.2f} MiB, error {r['error']:+.1%} (target "
              f"{r['target']:.0%}: {'met' if r['within_target'] else 'MISSED'})")
    print(f"activations: {result['activations_share']['value']:.1%} of the predicted op-output "
          f"peak ({time.time() - started:.0f} s)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
