"""Measure what swapping does on CPU: step time and device-resident peak, with vs without LMS.

Each trial runs in its own subprocess (fresh allocator; the env below must be set before
TensorFlow is imported): compute /CPU:0, host /CPU:1, LMS in deepcopy mode so swaps really copy,
BFC allocator, oneDNN kernels, one inter-op thread. Writes bench/results/lms_effect.json.

    python scripts/lms_effect.py                   # sizes 32 64, 3 repeats
    python scripts/lms_effect.py --sizes 32 --repeats 1
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# Must be set before TensorFlow is imported; trial subprocesses inherit them.
ENV = {"TF_CPU_ALLOCATOR_USE_BFC": "true", "TF_ENABLE_ONEDNN_OPTS": "1",
       "TF_CPP_MIN_LOG_LEVEL": "2"}
os.environ.update(ENV)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from lmstrain.lms import LMS, measure, record_graphs, split_cpu, verify_swaps  # noqa: E402
from lmstrain.lms.trial_memory import StepProbe, profiled_peaks  # noqa: E402
from lmstrain.model.losses import DiceLoss  # noqa: E402
from lmstrain.model.unet3d import isensee2017  # noqa: E402

MODEL = {"name": "isensee2017", "base_filters": 8, "depth": 4, "dropout": 0.1, "batch_size": 1}
WARMUP_STEPS, TIMED_STEPS = 3, 10
OUT = Path(__file__).resolve().parent.parent / "bench" / "results" / "lms_effect.json"

MEASURES = {
    "step_time_ratio": (
        "median wall time of a model.fit step with LMS / without (on_train_batch_begin to "
        f"on_train_batch_end, {TIMED_STEPS} steps after {WARMUP_STEPS} warm-up steps), per "
        "repeat; trials "
        "with and without LMS alternate, one subprocess each; the host is shared, so expect "
        "noise"),
    "device_peak": (
        "largest sum of live buffers allocated by ops placed on the compute device /CPU:0 during "
        "one profiled training step: the profiler's MemoryAllocation/MemoryDeallocation events "
        "(BFC allocator) replayed by buffer address; op placement from the executed partition "
        "graphs; the swap-outs' own allocations are host (/CPU:1) and not counted; requested "
        "bytes (BFC rounding excluded)"),
    "reduction": ("1 - device peak with LMS / device peak without, per repeat (trials with and "
                  "without LMS alternate); of_medians uses the medians of all trials"),
}


def trial(size, swap, sync_mode, logdir):
    """One measurement in this process; returns a dict of figures."""
    split_cpu()
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(0)
    model = isensee2017((size,) * 3, base_filters=MODEL["base_filters"], depth=MODEL["depth"],
                        dropout=MODEL["dropout"])
    model.compile(keras.optimizers.Adam(1e-3), DiceLoss())
    n = WARMUP_STEPS + TIMED_STEPS + 1
    rng = keras.random.SeedGenerator(0)
    x = keras.random.normal((n, size, size, size, 4), seed=rng).numpy()
    y = (keras.random.uniform((n, size, size, size, 3), seed=rng) > 0.5).numpy().astype("float32")
    lms = LMS(host_device="/CPU:1", compute_device="/CPU:0", copy_mode="deepcopy",
              sync_mode=sync_mode)
    probe = StepProbe(profile_step=n - 1, logdir=logdir)
    with record_graphs() as recorded:
        model.fit(x, y, batch_size=MODEL["batch_size"], epochs=1, shuffle=False, verbose=0,
                  callbacks=[lms, probe] if swap else [probe])
    graphs = recorded.run_metadata
    peaks = profiled_peaks(logdir, graphs, "/CPU:0")
    runs = measure.op_runs(measure.load_xspace(logdir))
    timed = probe.times[WARMUP_STEPS:WARMUP_STEPS + TIMED_STEPS]
    result = {
        "step_time_s": statistics.median(timed),
        "step_times_s": timed,
        "device_peak_bytes": peaks["step_peak_bytes"],
        "device_peak_allocation_bytes": peaks["step_peak_allocation_bytes"],
        "peak_at_op": peaks["peak_at_op"],
        "live_at_peak": peaks["live_at_peak"],
        "device_plus_host_peak_bytes": peaks["device_plus_host_peak_bytes"],
        "buffers_not_counted": peaks["buffers_not_counted"],
    }
    if swap:
        plan, check = [(p, c) for p, c in zip(lms.plans, verify_swaps(graphs, lms.plans))
                       if c.found][-1]
        timings = measure.swapin_timings(runs, [plan])
        result.update({
            "swapped_tensors": len(plan.swapped),
            "swapped_bytes_per_step": plan.swapped_bytes,
            "swap_nodes_live_after_grappler": f"{check.live_swap_nodes}/{check.swap_nodes}",
            "swap_ins_started_after_trigger": f"{sum(t.after_trigger for t in timings)}/"
                                              f"{len(plan.swap_ins)}",
        })
    return result


def run_trial_subprocess(size, swap, sync_mode):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--trial", str(size), "1" if swap else "0", sync_mode,
               str(out)]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def summarise(runs):
    values = sorted(runs)
    return {"median": statistics.median(values), "min": values[0], "max": values[-1],
            "runs": runs}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--sync-mode", default=LMS().settings.sync_mode,
                        choices=["async", "swapout", "swapin", "both"])
    parser.add_argument("--trial", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trial:
        size, swap, sync_mode, out = args.trial
        with tempfile.TemporaryDirectory() as logdir:
            Path(out).write_text(json.dumps(trial(int(size), swap == "1", sync_mode, logdir)))
        return
    results = {"model": MODEL, "environment": {**ENV, "inter_op_threads": 1,
                                               "compute_device": "/CPU:0",
                                               "host_device": "/CPU:1", "copy_mode": "deepcopy"},
               "lms_settings": LMS(sync_mode=args.sync_mode).settings.to_dict(),
               "measure": MEASURES,
               "sizes": {}}
    for size in args.sizes:
        trials = {False: [], True: []}
        for repeat in range(args.repeats):
            for swap in (False, True):
                trials[swap].append(run_trial_subprocess(size, swap, args.sync_mode))
                print(f"{size}^3 repeat {repeat + 1} lms={'on' if swap else 'off'}: "
                      f"step {trials[swap][-1]['step_time_s']:.2f} s, device peak "
                      f"{trials[swap][-1]['device_peak_bytes'] / 2**20:.1f} MiB", flush=True)
        off, on = trials[False], trials[True]
        peak_off = summarise([t["device_peak_bytes"] for t in off])
        peak_on = summarise([t["device_peak_bytes"] for t in on])
        ratios = [a["step_time_s"] / b["step_time_s"] for a, b in zip(on, off)]
        reductions = [1 - a["device_peak_bytes"] / b["device_peak_bytes"] for a, b in zip(on, off)]
        results["sizes"][f"{size}^3"] = {
            "input_shape": [size, size, size, 4],
            "step_time_ratio": {**summarise(ratios), "measure": MEASURES["step_time_ratio"]},
            "device_peak_bytes_without_lms": {**peak_off, "measure": MEASURES["device_peak"]},
            "device_peak_bytes_with_lms": {**peak_on, "measure": MEASURES["device_peak"]},
            "reduction": {**summarise(reductions),
                          "of_medians": 1 - peak_on["median"] / peak_off["median"],
                          "measure": MEASURES["reduction"]},
            "trials_without_lms": off,
            "trials_with_lms": on,
        }
        print(f"{size}^3: step time ratio {statistics.median(ratios):.2f}, device peak "
              f"{peak_off['median'] / 2**20:.1f} -> {peak_on['median'] / 2**20:.1f} MiB "
              f"(reduction {statistics.median(reductions):.0%}, "
              f"{min(reductions):.0%}..{max(reductions):.0%})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
