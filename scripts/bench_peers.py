"""Benchmark: swapping and its peers under one budget, network and batch (`make bench-peers`).

Each peer is searched for its largest size exactly as `lmstrain maxres` searches (the sweep's
search, seeded by the simulator; every trial a real training run in a fresh process through
lmstrain.planning.harness): configs/demo.yaml's network, batch 1, --device-memory 256MiB.
Without swapping the trial's CPU BFC allocator is capped at the budget (`cpu-capped`); with
swapping the trial runs uncapped and its device-attributed peak must be within the budget
(`cpu-device-attributed`): two different measurements, named beside every ratio.

The Keras peer is the best `keras.RematScope` mode that runs: every mode is first tried once at
the common size (capped, batch 1); the mode with the lowest measured peak among those that
trained is searched. At the common size each peer also reports its step time (median of two
timed steps after the harness's warm-up), its peak, the bytes its swap nodes copy out in the
profiled step (the plan verified in the executed graph; 0 without swapping), the convolution
ops in the executed (post-optimisation) step graph, and the step's FLOPs counted by the
simulator on the traced step (convolutions and matrix products; recomputed ones included).

Result: bench/results/peers/results.json (with a `markdown` table for bench/README.md) and one
sweep folder per peer beside it (resumable: delete bench/results/peers to measure again).
"""

import argparse
import json
import re
from pathlib import Path

from tqdm import tqdm

from lmstrain.atomic import write_text
from lmstrain.config import load_config
from lmstrain.model.unet3d import KERAS_REMAT, divisor
from lmstrain.planning.harness import SOURCES
from lmstrain.planning.sizing import scaled_shape
from lmstrain.planning.sweep import Sweep, SweepOptions, TrialSpec, run_trial_process
from lmstrain.units import format_bytes, parse_bytes

ROOT = Path(__file__).resolve().parent.parent
KERAS = "keras"  # the peer whose model.remat is the best RematScope mode that runs

# The peers, in the table's order: (key, label, model.remat, swap settings or None for no
# swapping). A row with swap settings runs the harness's swap trials with those SwapSettings
# fields ({} = the callback's defaults).
PEERS = [
    ("none", "no saving", "none", None),
    (KERAS, "Keras rematerialisation", None, None),  # model.remat chosen by keras_modes()
    ("blocks", "block-level tf.recompute_grad", "blocks", None),
    ("swap", "lmstrain swapping", "none", {}),
    ("swap-recompute", "lmstrain swapping + recompute", "none", {"recompute": "cheap"}),
]


def keras_modes(config_path, shape, budget, timeout_s):
    """One capped trial per ``keras_*`` value of model.remat at ``shape``: how each ended."""
    modes = {}
    for remat in tqdm(KERAS_REMAT, desc="RematScope modes", unit="mode"):
        config = load_config(config_path, [f"model.remat={remat}"])
        trial = run_trial_process(config, TrialSpec(shape, 1, False, budget), timeout_s)
        modes[remat] = {"mode": KERAS_REMAT[remat], "status": trial.status,
                        "reason": first_lines(trial.reason),
                        "measured_peak_bytes": trial.measured_peak_bytes, "source": trial.source}
    return modes


def first_lines(reason, count=2):
    """The first ``count`` non-empty lines of an error message, without terminal colours."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", reason).splitlines()]
    return " ".join([line for line in lines if line][:count])


def best_keras_mode(modes):
    """The ``keras_*`` value that trained with the lowest measured peak (None if none did)."""
    ran = [(m["measured_peak_bytes"], remat) for remat, m in modes.items() if m["status"] == "ok"]
    return min(ran)[1] if ran else None


def search(config_path, remat, swap, sizes, budget, common, out_dir, timeout_s):
    """One peer: its maxres sweep (``out_dir``, resumed) and its trial at the ``common`` size."""
    config = load_config(config_path, [f"model.remat={remat}"])
    options = SweepOptions.from_config(config, sizes=sizes, batch_sizes=[1],
                                       lms="off" if swap is None else "on", budgets=[budget],
                                       timeout_s=timeout_s)
    options.swap = swap or {}
    sweep = Sweep(config, options, out_dir, resume=True)
    results = sweep.run()
    shape = scaled_shape(config.data.shape, common, divisor(config.model.depth))
    at_common = sweep.trial(TrialSpec(shape, 1, swap is not None, budget)).to_dict()
    return results, at_common


def row(key, label, remat, swap, results, at_common):
    """A peer's row: its largest size and its measurements at the common size."""
    summary, extra = results["summary"][0], at_common["extra"]
    return {"key": key, "label": label, "remat": remat, "swap": swap,
            "max_size": summary["max_size"], "max_shape": summary["max_shape"],
            "max_voxels": summary["max_voxels"], "limited_by": summary["limited_by"],
            "sources": sorted({t["source"] for t in results["trials"] if t["source"]}),
            "trials": [{k: t[k] for k in ("shape", "status", "reason", "measured_peak_bytes",
                                          "source")} for t in results["trials"]],
            "common": {"shape": at_common["shape"], "status": at_common["status"],
                       "reason": at_common["reason"],
                       "source": at_common["source"],
                       "measured_peak_bytes": at_common["measured_peak_bytes"],
                       "step_time_s": at_common["step_time_s"],
                       "swapped_bytes": extra.get("swapped_bytes", 0),
                       "executed_convolutions": extra.get("executed_convolutions"),
                       "flops_counted": extra.get("flops")}}


def markdown(rows, modes, common, budget):
    """The table for bench/README.md, and the notes that say how each column was obtained."""
    base = rows[0]
    edge = f"{common}^3"
    lines = [f"| peer | `model.remat` / swap | largest size ({format_bytes(budget)}) | voxels "
             f"vs. no saving (sources) | step time at {edge} | peak at {edge} | bytes copied by "
             f"swap nodes at {edge} | convolutions executed at {edge} | FLOPs at {edge} "
             "(counted) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["common"]
        ratio = "-"
        if r["max_voxels"] and base["max_voxels"]:
            pair = " vs. ".join(f"`{s}`" for s in (*r["sources"], *base["sources"]))
            ratio = f"{r['max_voxels'] / base['max_voxels']:.2f}x ({pair})"
        how = r["remat"] if r["swap"] is None else f"{r['remat']} / swap {json.dumps(r['swap'])}"
        cells = [r["label"], f"`{how}`", f"{r['max_size'] or '-'} ({r['limited_by'] or ''})",
                 ratio]
        if c["status"] == "ok":
            flops = f"{c['flops_counted'] / 1e9:.1f} GFLOP" if c["flops_counted"] else "-"
            cells += [f"{c['step_time_s']:.2f} s",
                      f"{format_bytes(c['measured_peak_bytes'])} (`{c['source']}`)",
                      format_bytes(c["swapped_bytes"]), str(c["executed_convolutions"]), flops]
        else:
            cells += [f"{c['status']}: {first_lines(c['reason'])}", "", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Keras `RematScope` modes, one capped trial each at {edge}:", ""]
    for remat, m in modes.items():
        what = (f"trains, peak {format_bytes(m['measured_peak_bytes'])}"
                if m["status"] == "ok" else f"{m['status']}: {m['reason']}")
        lines.append(f"- `{m['mode']}` (`model.remat: {remat}`): {what}")
    blocks = next((r for r in rows if r["key"] == "blocks"), None)
    if blocks and blocks["common"]["status"] == base["common"]["status"] == "ok":
        before, after = (base["common"]["measured_peak_bytes"],
                         blocks["common"]["measured_peak_bytes"])
        verdict = "lowers" if after < before else "does **not** lower"
        lines += ["", f"The block-level peer {verdict} the peak at {edge} against no saving: "
                      f"{format_bytes(before)} -> {format_bytes(after)} (both "
                      f"`{blocks['common']['source']}`)."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    parser.add_argument("--device-memory", default="256MiB")
    parser.add_argument("--sizes", default="48:128:8", help="first:last:step")
    parser.add_argument("--common-size", type=int, default=48)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per trial")
    parser.add_argument("--out", default=str(ROOT / "bench/results/peers"))
    args = parser.parse_args()
    budget, out = parse_bytes(args.device_memory), Path(args.out)
    first, last, step = (int(s) for s in args.sizes.split(":"))
    config = load_config(args.config)
    common_shape = scaled_shape(config.data.shape, args.common_size, divisor(config.model.depth))
    modes = keras_modes(args.config, common_shape, budget, args.timeout)
    rows = []
    for key, label, remat, swap in tqdm(PEERS, desc="Peers", unit="peer"):
        if key == KERAS:
            remat = best_keras_mode(modes)
            if remat is None:
                continue  # no RematScope mode trains: the modes' list says why
            label = f"{label} (RematScope `{KERAS_REMAT[remat]}`)"
        results, at_common = search(args.config, remat, swap, list(range(first, last + 1, step)),
                                    budget, args.common_size, out / key, args.timeout)
        rows.append(row(key, label, remat, swap, results, at_common))
    result = {"config": str(Path(args.config).resolve().relative_to(ROOT)), "batch": 1,
              "device_memory_bytes": budget, "sizes": args.sizes,
              "common_size": args.common_size, "keras_modes": modes, "peers": rows,
              "measure": {source: SOURCES[source] for r in rows for source in r["sources"]},
              "flops": "counted by the simulator on the traced training step "
                       "(lmstrain.lms.sim.dataflow.flops: convolutions and matrix products, 2 per "
                       "multiply-add, element-wise ops one per element; the ops the step's outputs "
                       "need; recomputed ops included)",
              "swapped_bytes": "bytes the swap nodes of the plan verified in the executed "
                               "(post-optimisation) step graph copy to the host per step"}
    result["markdown"] = markdown(rows, modes, args.common_size, budget)
    write_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    print(result["markdown"])
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
