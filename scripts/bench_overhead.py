"""Benchmark: what swapping costs in step time, measured on this CPU and modelled for GPUs.

measured  configs/demo.yaml's network at batch 1, trained with and without swapping by the
          same subprocess trial `lmstrain maxres` runs (lmstrain.planning.harness: random tensors, two
          warm-up steps, median of two timed steps; swapping in deepcopy mode, so every swap is
          a real copy between two logical CPUs sharing this machine's RAM). Trials with and
          without swapping alternate; the ratio is per repeat. On a CPU the copies compete with
          compute for the same cores and memory bus, so this is not a GPU's overhead.
modelled  configs/brats2021_isensee.yaml on a GPU with --device-memory: for each size from the
          largest that fits without swapping up to the largest that fits with it, the
          simulator's auto-tuned plan (bytes swapped per step, step FLOPs) through the
          transfer-time model (lmstrain.planning.transfer) per link, beside TFLMS's published 3%
          overhead at 1.4x and ~27% at 2.4x the voxels (NVLink).

Result: bench/results/overhead.json (with a markdown summary for bench/README.md).
"""

import argparse
import json
import statistics
from math import prod
from pathlib import Path

from tqdm import tqdm

from lmstrain.atomic import write_text
from lmstrain.config import load_config
from lmstrain.planning.harness import WARMUP_STEPS
from lmstrain.planning.sizing import check_size, default_host_memory, max_size, scaled_shape
from lmstrain.model.unet3d import divisor
from lmstrain.planning.sweep import TrialSpec, run_trial_process
from lmstrain.planning.transfer import ASSUMPTIONS, LINKS, transfer_model
from lmstrain.units import format_bytes, parse_bytes

ROOT = Path(__file__).resolve().parent.parent


def project_path(path) -> str:
    """``path`` relative to the project when inside it: results name no machine's folders."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def measured(config_path, sizes, repeats):
    """Step times with and without swapping on this machine, per size."""
    config = load_config(config_path)
    rows = []
    with tqdm(total=len(sizes) * repeats * 2, desc="CPU trials", unit="trial") as bar:
        for size in sizes:
            shape = scaled_shape(config.data.shape, size, divisor(config.model.depth))
            times = {False: [], True: []}
            for _ in range(repeats):
                for swap in (False, True):
                    trial = run_trial_process(config, TrialSpec(shape, 1, swap, 16 * 2**30),
                                              timeout_s=1800)
                    if not trial.ok:
                        raise SystemExit(f"trial {shape} swap={swap} ended {trial.status}: "
                                         f"{trial.reason}")
                    times[swap].append(trial.step_time_s)
                    bar.update()
            ratios = [on / off for off, on in zip(times[False], times[True])]
            rows.append({"size": size, "shape": list(shape), "batch": 1,
                         "step_time_s_without": times[False], "step_time_s_with": times[True],
                         "ratio_median": statistics.median(ratios)})
    return rows


def modelled(config_path, budget, host_memory, executor, batch):
    """Transfer-model overhead of the auto-tuned plan at each size that needs swapping."""
    config = load_config(config_path)
    batch = batch or config.train.batch_size
    step = divisor(config.model.depth)
    base = max_size(config, batch, budget, False, executor=executor).shape
    if base is None:
        raise SystemExit(f"{config_path}: nothing fits in {format_bytes(budget)} without "
                         "swapping")
    rows, size = [], max(base) + step
    with tqdm(desc="Simulated sizes", unit="size") as bar:
        while True:
            shape = scaled_shape(config.data.shape, size, step)
            fits, limit, estimate, _ = check_size(config, shape, batch, budget, True, executor,
                                                  host_memory)
            bar.update()
            if not fits:
                break
            model = transfer_model(estimate.swapped_bytes, estimate.flops)
            rows.append({"size": size, "shape": list(shape),
                         "voxel_factor": prod(shape) / prod(base),
                         "predicted_peak_bytes": int(estimate.peak_bytes),
                         "swapped_bytes": int(estimate.swapped_bytes), "flops": estimate.flops,
                         "host_bytes": int(estimate.host_bytes),
                         "overhead": {r["link"]: r["overhead"] for r in model["links"]},
                         "bandwidth_bound": {r["link"]: r["bandwidth_bound"]
                                             for r in model["links"]}})
            size += step
    return {"config": project_path(config_path), "batch": batch, "device_memory_bytes": budget,
            "host_memory_bytes": host_memory, "executor": executor,
            "largest_without_swapping": list(base), "stopped_by": limit, "sizes": rows}


def summary_markdown(cpu, gpu):
    lines = ["### Measured on this CPU", "",
             "| size | step time without swapping (s) | with (s) | ratio |", "|---|---|---|---|"]
    for r in cpu["sizes"]:
        lines.append(f"| {'x'.join(map(str, r['shape']))} | "
                     f"{statistics.median(r['step_time_s_without']):.2f} | "
                     f"{statistics.median(r['step_time_s_with']):.2f} | "
                     f"{r['ratio_median']:.2f} |")
    lines += ["", f"Measured: {cpu['measure']}", "",
              f"### Modelled for a GPU ({format_bytes(gpu['device_memory_bytes'])}, batch "
              f"{gpu['batch']}, {gpu['config']})", "",
              "| shape | voxels vs. largest without swapping | swapped per step | "
              + " | ".join(LINKS) + " |", "|---|---|---|" + "---|" * len(LINKS)]
    for r in gpu["sizes"]:
        cells = [f"{r['overhead'][link]:.0%}" + (" (copy-bound)" if r["bandwidth_bound"][link]
                                                 else "") for link in LINKS]
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['voxel_factor']:.2f}x | "
                     f"{format_bytes(r['swapped_bytes'])} | " + " | ".join(cells) + " |")
    lines += ["", f"Modelled ({ASSUMPTIONS}); swapped bytes and FLOPs from the simulator's "
                  "auto-tuned plan. TFLMS published 3% overhead at 1.4x and ~27% at 2.4x the "
                  "voxels on NVLink (measured on GPUs)."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-config", default=str(ROOT / "configs/demo.yaml"))
    parser.add_argument("--cpu-sizes", default="48,64,80")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gpu-config", default=str(ROOT / "configs/brats2021_isensee.yaml"))
    parser.add_argument("--device-memory", default="16GiB")
    parser.add_argument("--host-memory", default=None,
                        help="default: not a limit with the GPU executor (only reported)")
    parser.add_argument("--executor", default="gpu", choices=["cpu", "gpu"])
    parser.add_argument("--out", default=str(ROOT / "bench/results/overhead.json"))
    args = parser.parse_args()
    cpu = {"config": project_path(args.cpu_config),
           "measure": "wall time of a training step on this machine's CPU, median of two "
                      f"timed steps after {WARMUP_STEPS} warm-up steps, one subprocess per trial "
                      "(lmstrain.planning.harness), swapping in deepcopy mode between two "
                      "logical CPUs; ratio = with / without, median of "
                      f"{args.repeats} alternating repeats",
           "sizes": measured(args.cpu_config, [int(s) for s in args.cpu_sizes.split(",")],
                             args.repeats)}
    gpu = modelled(args.gpu_config, parse_bytes(args.device_memory),
                   parse_bytes(args.host_memory) if args.host_memory
                   else default_host_memory(args.executor), args.executor, None)
    gpu["model"] = ASSUMPTIONS
    result = {"measured_cpu": cpu, "modelled_gpu": gpu,
              "summary_markdown": summary_markdown(cpu, gpu)}
    write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(result["summary_markdown"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
