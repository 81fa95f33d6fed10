"""Benchmark: the swapped step's device peak with each weight's update run early
(``lms.update_order: early``, the default) and where TensorFlow's executor puts it
(``tensorflow``), at fixed sizes, on the demo network and on the paper's network (base 16,
depth 5: sixteen times the weights).

measured  each network, batch 1, swapping with the default settings but for
          lms.update_order, trained by the trial harness (the trial `lmstrain maxres` runs:
          fresh subprocess, deepcopy swaps between two logical CPUs, a new batch each step,
          two warm-up steps, two timed steps, one profiled step), the two orders alternating:
          the device-attributed peak (what the allocator held when the step began plus the
          profiled step's peak in allocator chunks), the step's op-output peak (requested
          bytes, no chunk rounding), their difference as the allocator's waste share of the
          peak, and the op at the peak.
simulated the simulator's op-output peak of the same step (CPU executor order), for comparison.

Result: bench/results/update_order.json (with a markdown summary for bench/README.md).
"""

import argparse
import json
from pathlib import Path

from bench_lean_norm import measured, measured_cells, swapped_trial, table_header
from tqdm import tqdm

from lmstrain.atomic import write_text
from lmstrain.config import load_config

ROOT = Path(__file__).resolve().parent.parent
ORDERS = ("tensorflow", "early")
NETWORKS = {"configs/demo.yaml": (96, 104), "configs/brats2021_isensee.yaml": (64, 96)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "update_order.json"))
    args = parser.parse_args()
    cases = [(network, size, order) for network, sizes in NETWORKS.items() for size in sizes
             for order in ORDERS]
    runs = {case: [] for case in cases}
    with tqdm(total=args.repeats * len(cases), desc="Trials", unit="trial") as bar:
        for _ in range(args.repeats):
            for case in cases:
                network, size, order = case
                runs[case].append(swapped_trial(config_of(network), size,
                                                f"{network} {size}^3, update_order {order}",
                                                {"update_order": order}))
                bar.update()
    rows = [{"config": network, "size": size, "update_order": order,
             **measured(runs[case], config_of(network), size, {"update_order": order})}
            for case in cases for network, size, order in [case]]
    result = {"batch": 1, "repeats": args.repeats,
              "measure": __doc__.split("\n\n")[1].strip(), "rows": rows,
              "markdown": markdown(rows)}
    write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(result["markdown"])


def config_of(network):
    return load_config(ROOT / network)


def markdown(rows):
    lines = ["Batch 1, swapping (measured on this CPU, device-attributed, median of the "
             "runs; the simulated column is the simulator's, not measured):", "",
             *table_header(["config", "size", "lms.update_order"])]
    for r in rows:
        lines.append(f"| `{r['config']}` | {r['size']}^3 | {r['update_order']} | "
                     + measured_cells(r))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
