"""Measure what swapping does on CPU: step time and device-resident peak, with vs without LMS.

Each trial runs in its own subprocess through the trial harness (lmstrain.planning.harness:
fresh allocator, compute /CPU:0, host /CPU:1, LMS in deepcopy mode so swaps really copy, BFC
allocator, oneDNN kernels, one inter-op thread), on configs/demo.yaml's network built as
`lmstrain fit` builds it. Writes bench/results/lms_effect.json.

    python scripts/lms_effect.py                   # sizes 32 64, 3 repeats
    python scripts/lms_effect.py --sizes 32 --repeats 1
"""

import argparse
import json
import statistics
from pathlib import Path

from lmstrain.config import load_config
from lmstrain.lms import SwapSettings
from lmstrain.planning import harness

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo.yaml"  # Isensee U-Net, base 8 filters, depth 4, dropout 0.1
BATCH, TIMED_STEPS = 1, 10
OUT = ROOT / "bench" / "results" / "lms_effect.json"

MEASURES = {
    "step_time_ratio": (
        "median wall time of a model.fit step with LMS / without (on_train_batch_begin to "
        f"on_train_batch_end, {TIMED_STEPS} steps after {harness.WARMUP_STEPS} warm-up steps), "
        "per repeat; trials with and without LMS alternate, one subprocess each "
        "(lmstrain.planning.harness); the host is shared, so expect noise"),
    "device_peak": (
        "largest sum of live buffers (outputs and kernel scratch) allocated by ops placed on "
        "the compute device /CPU:0 during one profiled training step: the profiler's "
        "MemoryAllocation/MemoryDeallocation events (BFC allocator) replayed by buffer address; "
        "op placement from the executed partition graphs; the swap-outs' own allocations are "
        "host (/CPU:1) and not counted; requested bytes (BFC rounding excluded); batches "
        "prefetched by tf.data (not counted)"),
    "reduction": ("1 - device peak with LMS / device peak without, per repeat (trials with and "
                  "without LMS alternate); of_medians uses the medians of all trials"),
}


def trial(config, size, swap, sync_mode):
    """One measurement in a fresh subprocess through the trial harness."""
    run = harness.run_trial(harness.request(
        config.to_dict(), (size,) * 3, BATCH, swap={"sync_mode": sync_mode} if swap else None,
        batches="prefetched", timed_steps=TIMED_STEPS))
    if run["status"] != "ok":
        raise SystemExit(f"{size}^3 swap={swap}: trial ended {run['status']}: {run['reason']}")
    result = {
        "step_time_s": run["step_time_s"],
        "step_times_s": run["step_times_s"],
        "device_peak_bytes": run["step_peak_with_scratch_bytes"],
        "device_peak_allocation_bytes": run["step_peak_allocation_bytes"],
        "peak_at_op": run["peak_at_op"],
        "live_at_peak": run["live_at_peak"],
        "device_plus_host_peak_bytes": run["device_plus_host_peak_bytes"],
        "buffers_not_counted": run["buffers_not_counted"],
    }
    if swap:
        result.update({
            "swapped_tensors": run["swapped_tensors"],
            "swapped_bytes_per_step": run["swapped_bytes"],
            "swap_nodes_live_after_grappler": f"{run['live_swap_nodes']}/{run['swap_nodes']}",
            "swap_ins_started_after_trigger": f"{run['swap_ins_started_after_trigger']}/"
                                              f"{run['swap_ins']}",
        })
    return result


def summarise(runs):
    values = sorted(runs)
    return {"median": statistics.median(values), "min": values[0], "max": values[-1],
            "runs": runs}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--sync-mode", default=SwapSettings().sync_mode,
                        choices=["async", "swapout", "swapin", "both"])
    args = parser.parse_args(argv)
    config = load_config(CONFIG)
    m = config.model
    results = {"model": {"config": "configs/demo.yaml", "name": m.name,
                         "base_filters": m.base_filters, "depth": m.depth, "dropout": m.dropout,
                         "batch_size": BATCH},
               "environment": {**harness.MEASURE_ENV, "inter_op_threads": 1,
                               "compute_device": harness.COMPUTE, "host_device": harness.HOST,
                               "copy_mode": "deepcopy"},
               "lms_settings": SwapSettings(sync_mode=args.sync_mode).to_dict(),
               "measure": MEASURES,
               "sizes": {}}
    for size in args.sizes:
        trials = {False: [], True: []}
        for repeat in range(args.repeats):
            for swap in (False, True):
                trials[swap].append(trial(config, size, swap, args.sync_mode))
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
