"""Benchmark: swapping with and without recomputation (``lms.recompute``) at one size.

measured  configs/demo.yaml's network at one size, batch 1, trained by the trial harness (the
          trial `lmstrain maxres` runs: fresh subprocess, swapping in deepcopy mode between two
          logical CPUs, a new batch each step, two warm-up steps, timed steps, one profiled
          step) with `lms.recompute: none` and `cheap`, alternating, per repeat: bytes copied
          by swap nodes in a step (each swapped tensor's bytes times one swap-out plus its
          swap-ins, from the plan the callback applied), recompute ops live after Grappler,
          the device-attributed peak (resident + profiled step peak in allocator chunks), the
          step's op-output peak (requested bytes of the profiled step's device buffers, no
          chunk rounding) and the step time.
counted   FLOPs of the traced and rewritten step, counted op by op by the simulator
          (lmstrain.lms.sim.dataflow.flops: convolutions and matrix products, element-wise
          ops one per element), not measured.
modelled  configs/brats2021_isensee.yaml at the largest size simulated to fit 16 GiB at batch
          2 (GPU executor order): the simulator's plan with the default swap settings, without
          and with recomputation, through the transfer-time model
          (lmstrain.planning.transfer: bytes copied out and back, counted FLOPs) for PCIe 4;
          a model, not a measurement.

Result: bench/results/recompute.json (with a markdown summary for bench/README.md).
"""

import argparse
import json
import statistics
from pathlib import Path

from tqdm import tqdm

from lmstrain.atomic import write_text
from lmstrain.config import load_config
from lmstrain.lms import SwapSettings
from lmstrain.model.unet3d import divisor
from lmstrain.planning.simulate import simulate_step
from lmstrain.planning.sizing import scaled_shape
from lmstrain.planning.sweep import TrialSpec, run_trial_process
from lmstrain.planning.transfer import transfer_model

ROOT = Path(__file__).resolve().parent.parent
MODES = ("none", "cheap")
MIB = 2**20
BUDGET = 16 * 2**30  # far above the peak: only makes the trial measure the device's share


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "recompute.json"))
    parser.add_argument("--isensee-size", type=int, default=304,
                        help="largest edge for the modelled GPU rows (0: skip them)")
    args = parser.parse_args()
    config = load_config(args.config)
    shape = scaled_shape(config.data.shape, args.size, divisor(config.model.depth))
    trials = {mode: [] for mode in MODES}
    with tqdm(total=args.repeats * len(MODES), desc="Trials", unit="trial") as bar:
        for _ in range(args.repeats):
            for mode in MODES:
                result = run_trial_process(config, TrialSpec(shape, 1, True, BUDGET),
                                           timeout_s=3600, swap={"recompute": mode})
                if not result.ok:
                    raise SystemExit(f"recompute={mode}: trial ended {result.status}: "
                                     f"{result.reason}")
                trials[mode].append(result)
                bar.update()
    rows = []
    for mode in MODES:
        runs = trials[mode]
        extra = [r.extra for r in runs]
        flops = simulate_step(config, shape, 1, SwapSettings(recompute=mode),
                              executor="cpu").flops
        rows.append({
            "recompute": mode, "copied_bytes": extra[0]["copied_bytes"],
            "swapped_tensors": extra[0]["swapped_tensors"],
            "recomputed_tensors": extra[0]["recomputed_tensors"],
            "recompute_ops": extra[0]["recompute_ops"],
            "live_recompute_ops": [e["live_recompute_ops"] for e in extra],
            "live_swap_nodes": [f"{e['live_swap_nodes']}/{e['swap_nodes']}" for e in extra],
            "swap_ins_started_after_trigger": [
                f"{e['swap_ins_started_after_trigger']}/{e['swap_ins_timed']}" for e in extra],
            "device_attributed_peak_bytes": [r.measured_peak_bytes for r in runs],
            "device_attributed_peak_bytes_median": statistics.median(
                r.measured_peak_bytes for r in runs),
            "step_op_output_peak_bytes": [e["step_peak_bytes"] for e in extra],
            "step_time_s": [r.step_time_s for r in runs],
            "flops_counted": flops,
            "source": runs[0].source})
    base, new = rows
    summary = {"copied_bytes_change": new["copied_bytes"] / base["copied_bytes"] - 1,
               "flops_change": new["flops_counted"] / base["flops_counted"] - 1,
               "peak_change": (new["device_attributed_peak_bytes_median"]
                               / base["device_attributed_peak_bytes_median"] - 1)}
    modelled = gpu_model(args.isensee_size) if args.isensee_size else None
    result = {"config": "configs/demo.yaml" if Path(args.config).resolve()
              == ROOT / "configs" / "demo.yaml" else args.config,
              "shape": list(shape), "batch": 1, "measure": __doc__.split("\n\n")[1].strip(),
              "rows": rows, "summary": summary, "modelled": modelled,
              "markdown": markdown(shape, rows, summary, modelled)}
    write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(result["markdown"])


def gpu_model(size):
    """The modelled PCIe 4 overhead of the Isensee network at ``size``, batch 2, 16 GiB."""
    config = load_config(ROOT / "configs" / "brats2021_isensee.yaml")
    shape = scaled_shape(config.data.shape, size, divisor(config.model.depth))
    rows = []
    for mode in MODES:
        estimate = simulate_step(config, shape, 2, SwapSettings(recompute=mode),
                                 executor="gpu", device_memory=16 * 2**30)
        link = next(r for r in transfer_model(estimate.swapped_bytes, estimate.flops,
                                              estimate.swapped_in_bytes)["links"]
                    if r["link"].startswith("PCIe 4"))
        rows.append({"recompute": mode, "predicted_peak_bytes": int(estimate.peak_bytes),
                     "swapped_bytes": int(estimate.swapped_bytes),
                     "swapped_in_bytes": int(estimate.swapped_in_bytes),
                     "flops_counted": estimate.flops, "pcie4_overhead": link["overhead"]})
    return {"config": "configs/brats2021_isensee.yaml", "shape": list(shape), "batch": 2,
            "device_memory_bytes": 16 * 2**30, "executor": "gpu", "rows": rows}


def markdown(shape, rows, summary, modelled):
    lines = [f"configs/demo.yaml's network at {'x'.join(map(str, shape))}, batch 1, swapping "
             f"(measured on this CPU, device-attributed peaks; FLOPs counted, not measured):",
             "", "| lms.recompute | bytes copied per step | tensors swapped / recomputed | "
             "device-attributed peak (median) | step op-output peak | step time | FLOPs (counted) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['recompute']} | {r['copied_bytes'] / MIB:.1f} MiB | {r['swapped_tensors']} / "
            f"{r['recomputed_tensors']} | {r['device_attributed_peak_bytes_median'] / MIB:.1f} "
            f"MiB | {statistics.median(r['step_op_output_peak_bytes']) / MIB:.1f} MiB | "
            f"{statistics.median(r['step_time_s']):.2f} s | "
            f"{r['flops_counted'] / 1e9:.2f} G |")
    lines += ["", f"Recomputation: {summary['copied_bytes_change']:+.1%} bytes copied, "
                  f"{summary['flops_change']:+.2%} FLOPs counted, "
                  f"{summary['peak_change']:+.1%} device-attributed peak."]
    if modelled:
        lines += ["", f"Modelled (not measured), configs/brats2021_isensee.yaml at "
                      f"{'x'.join(map(str, modelled['shape']))}, batch 2, 16 GiB, GPU order:",
                  "", "| lms.recompute | predicted peak | copied out / back | FLOPs (counted) | "
                      "PCIe 4 overhead (model) |", "|---|---|---|---|---|"]
        for r in modelled["rows"]:
            lines.append(f"| {r['recompute']} | {r['predicted_peak_bytes'] / 2**30:.2f} GiB | "
                         f"{r['swapped_bytes'] / 2**30:.1f} / "
                         f"{r['swapped_in_bytes'] / 2**30:.1f} GiB | "
                         f"{r['flops_counted'] / 1e12:.2f} T | {r['pcie4_overhead']:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
