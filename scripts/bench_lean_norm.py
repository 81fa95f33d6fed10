"""Benchmark: the swapped step's device peak with Keras's instance normalisation and with
``model.norm: instance_lean``, at fixed sizes, on both decoder forms.

measured  configs/demo.yaml's network, batch 1, swapping with the default settings, trained by
          the trial harness (the trial `lmstrain maxres` runs: fresh subprocess, deepcopy swaps
          between two logical CPUs, a new batch each step, two warm-up steps, two timed
          steps, one profiled step), with `model.norm: instance` and `instance_lean`
          alternating, with and without `model.split_concat`: the device-attributed peak
          (what the allocator held when the step began plus the profiled step's peak in
          allocator chunks), the step's op-output peak (requested bytes, no chunk rounding),
          their difference as the allocator's waste share of the peak, and the op at the peak.
simulated the simulator's op-output peak of the same step (CPU executor order), for comparison.

Result: bench/results/lean_norm.json (with a markdown summary for bench/README.md).
"""

import argparse
import json
import statistics
from pathlib import Path

from tqdm import tqdm

from lmstrain.atomic import write_text
from lmstrain.config import load_config
from lmstrain.lms import SwapSettings
from lmstrain.planning.simulate import simulate_step
from lmstrain.planning.sweep import TrialSpec, run_trial_process

ROOT = Path(__file__).resolve().parent.parent
NORMS = ("instance", "instance_lean")
FORMS = (False, True)  # model.split_concat
MIB = 2**20
BUDGET = 16 * 2**30  # far above the peak: only makes the trial measure the device's share


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="96,104,112,120")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "lean_norm.json"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    cases = [(size, split, norm) for size in sizes for split in FORMS for norm in NORMS]
    runs = {case: [] for case in cases}
    with tqdm(total=args.repeats * len(cases), desc="Trials", unit="trial") as bar:
        for _ in range(args.repeats):
            for case in cases:
                runs[case].append(trial(*case))
                bar.update()
    rows = [row(case, runs[case]) for case in cases]
    result = {"config": "configs/demo.yaml", "batch": 1, "repeats": args.repeats,
              "measure": __doc__.split("\n\n")[1].strip(), "rows": rows,
              "markdown": markdown(rows)}
    write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(result["markdown"])


def config_of(split, norm):
    return load_config(ROOT / "configs" / "demo.yaml",
                       [f"model.split_concat={str(split).lower()}", f"model.norm={norm}"])


def trial(size, split, norm):
    """The swap-on trial `lmstrain maxres` runs (a :class:`~lmstrain.planning.sweep.Trial`)."""
    return swapped_trial(config_of(split, norm), size,
                         f"{size}^3 split_concat={split} norm={norm}")


def swapped_trial(config, size, label, swap=None):
    """The swap-on trial `lmstrain maxres` runs at ``size``^3, batch 1, far under budget;
    ``swap``: SwapSettings fields (None: the defaults)."""
    result = run_trial_process(config, TrialSpec((size,) * 3, 1, True, BUDGET), timeout_s=3600,
                               swap=swap)
    if not result.ok:
        raise SystemExit(f"{label}: trial ended {result.status}: {result.reason}")
    return result


def row(case, runs):
    size, split, norm = case
    return {"size": size, "split_concat": split, "norm": norm,
            **measured(runs, config_of(split, norm), size)}


def measured(runs, config, size, swap=None):
    """The median peaks of ``runs`` (swapped trials of ``config`` at ``size``^3 with the
    SwapSettings fields ``swap``), their allocator waste share and the simulator's op-output
    peak of the same step."""
    peak = statistics.median(r.measured_peak_bytes for r in runs)
    op_output = statistics.median(r.extra["step_peak_bytes"] for r in runs)
    chunks = statistics.median(r.extra["step_peak_allocation_bytes"] for r in runs)
    predicted = simulate_step(config, (size,) * 3, 1, SwapSettings(**(swap or {})),
                              executor="cpu").step_peak_bytes
    return {"device_attributed_peak_bytes": [r.measured_peak_bytes for r in runs],
            "device_attributed_peak_bytes_median": peak,
            "step_op_output_peak_bytes_median": op_output,
            "waste_share": (chunks - op_output) / peak,
            "peak_at_op": [r.extra["peak_at_op"].split("/", 1)[-1] for r in runs],
            "live_swap_nodes": [f"{r.extra['live_swap_nodes']}/{r.extra['swap_nodes']}"
                                for r in runs],
            "simulated_step_op_output_peak_bytes": predicted,
            "source": runs[0].source}


def markdown(rows):
    lines = ["configs/demo.yaml's network, batch 1, swapping (measured on this CPU, "
             "device-attributed; the simulated column is the simulator's, not measured):", "",
             *table_header(["size", "model.split_concat", "model.norm"])]
    for r in rows:
        lines.append(f"| {r['size']}^3 | {str(r['split_concat']).lower()} | {r['norm']} | "
                     + measured_cells(r))
    return "\n".join(lines)


MEASURED_COLUMNS = ("device-attributed peak", "op-output peak", "allocator waste", "peak at",
                    "op-output peak (simulated)")


def table_header(leading):
    """The header and rule lines of a table: the ``leading`` columns, then those of
    :func:`measured_cells`."""
    columns = [*leading, *MEASURED_COLUMNS]
    return "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)


def measured_cells(row):
    """The table cells of :func:`measured`'s figures: peaks, waste, peak op, simulated."""
    return (f"{row['device_attributed_peak_bytes_median'] / MIB:.1f} MiB | "
            f"{row['step_op_output_peak_bytes_median'] / MIB:.1f} MiB | "
            f"{row['waste_share']:.1%} | "
            f"`{row['peak_at_op'][0].removeprefix('isensee2017_1/')}` | "
            f"{row['simulated_step_op_output_peak_bytes'] / MIB:.1f} MiB |")


if __name__ == "__main__":
    main()
