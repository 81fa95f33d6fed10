"""Benchmark: the step time of `train.distribute: mirrored` on logical CPUs against one device.

measured  configs/demo.yaml's network at one size, the same global batch: one device, and
          tf.distribute.MirroredStrategy over two logical CPUs at half the batch each, both
          without and with swapping (each replica to its own logical-CPU host, deepcopy mode).
          Every trial runs in the trial harness's fresh subprocess (random resident batches,
          two warm-up steps, median of the timed steps); variants alternate within each
          repeat. The harness runs one inter-op thread (a reproducible op order), so the
          replicas' ops take turns; the two logical CPUs share this machine's two cores and
          one RAM. The mirrored rows show the machinery's overhead (collective all-reduce, two
          replica graphs, the batch split), not scaling, and nothing about GPUs (NCCL, PCIe)
          can be read from them.

Result: bench/results/distribute.json (with a markdown summary for bench/README.md).
"""

import argparse
import json
import statistics
from pathlib import Path

from tqdm import tqdm

from lmstrain.atomic import write_text
from lmstrain.config import load_config
from lmstrain.model.unet3d import divisor
from lmstrain.planning import harness
from lmstrain.planning.sizing import scaled_shape

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = [  # (name, replicas, swapping)
    ("one device", 1, False), ("mirrored, 2 replicas", 2, False),
    ("one device, swapping", 1, True), ("mirrored, 2 replicas, swapping", 2, True)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--global-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per trial")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "distribute.json"))
    args = parser.parse_args()
    config = load_config(args.config)
    shape = scaled_shape(config.data.shape, args.size, divisor(config.model.depth))
    times = {name: [] for name, _, _ in VARIANTS}
    with tqdm(total=args.repeats * len(VARIANTS), desc="Trials", unit="trial") as bar:
        for _ in range(args.repeats):
            for name, replicas, swap in VARIANTS:
                req = harness.request(config.to_dict(), shape, args.global_batch // replicas,
                                      swap={} if swap else None, timed_steps=args.steps,
                                      profile=False, replicas=replicas)
                result = harness.run_trial(req, timeout_s=1800)
                if result["status"] != "ok":
                    raise SystemExit(f"{name}: trial ended {result['status']}: "
                                     f"{result['reason']}")
                times[name].append(result["step_time_s"])
                bar.update()
    base = statistics.median(times["one device"])
    rows = [{"variant": name, "replicas": replicas, "swapping": swap,
             "batch_per_replica": args.global_batch // replicas,
             "global_batch": args.global_batch, "step_time_s": times[name],
             "step_time_s_median": statistics.median(times[name]),
             "vs_one_device": statistics.median(times[name]) / base}
            for name, replicas, swap in VARIANTS]
    result = {"config": str(Path(args.config).resolve().relative_to(ROOT))
              if Path(args.config).resolve().is_relative_to(ROOT) else args.config,
              "shape": list(shape), "measure": __doc__.split("\n\n")[1].strip(), "rows": rows,
              "markdown": markdown(shape, rows)}
    write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(result["markdown"])


def markdown(shape, rows):
    lines = [f"Measured on this CPU (2 cores), {'x'.join(map(str, shape))}, configs/demo.yaml's "
             f"network, median step time over repeats (each the median of its timed steps):",
             "", "| variant | batch per replica x replicas | step time | vs one device |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['batch_per_replica']} x {r['replicas']} | "
                     f"{r['step_time_s_median']:.3f} s | {r['vs_one_device']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
