"""Write bench/README.md from the result files under bench/results/.

Every number in the generated tables says whether it was measured (where and how) or
simulated. Run by `make bench-all` after the benchmarks, or on its own.
"""

import json
from pathlib import Path

import numpy as np

from lmstrain.atomic import write_text
from lmstrain.planning.sweep import swap_gain
from lmstrain.units import format_bytes

ROOT = Path(__file__).resolve().parent.parent / "bench"
RESULTS = ROOT / "results"


def load(name):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def maxres_section(title, results, how):
    if not results:
        return []
    lines = [f"### {title}", "", how, "",
             "| budget | batch | swapping | largest size | shape | voxels | vs. without | "
             "limited by | host memory needed |", "|---|---|---|---|---|---|---|---|---|"]
    summary = results["summary"]
    for row in summary:
        gain = swap_gain(summary, row)
        ratio = f"{gain:.2f}x" if gain else ""
        shape = "x".join(map(str, row["max_shape"])) if row["max_shape"] else "-"
        lines.append(f"| {format_bytes(row['device_memory_bytes'])} | "
                     f"{row.get('max_batch', row['batch'])} | {'on' if row['lms'] else 'off'} | "
                     f"{row['max_size'] or '-'} | {shape} | {row['max_voxels'] or '-'} | {ratio} | "
                     f"{row['limited_by'] or ''} | {_host_bytes(results, row)} |")
    sources = {t["source"]: t.get("extra", {}).get("measure", "")
               for t in results["trials"] if t.get("source")}
    lines += ["", "| size | batch | swapping | status | measured peak | predicted peak | "
                  "step time | source |", "|---|---|---|---|---|---|---|---|"]
    for t in results["trials"]:
        lines.append(f"| {'x'.join(map(str, t['shape']))} | {t['batch']} | "
                     f"{'on' if t['lms'] else 'off'} | {t['status']} | "
                     f"{_bytes(t['measured_peak_bytes'])} | {_bytes(t['predicted_peak_bytes'])}"
                     f" | {_seconds(t['step_time_s'])} | `{t['source']}` |")
    lines += [""] + [f"- `{source}`: {how}" for source, how in sorted(sources.items()) if how]
    return lines + [""]


def _host_bytes(results, row):
    """Host memory the swapped tensors need at a swap-on maximum (the simulator's figure)."""
    if not row["lms"] or not row["max_shape"]:
        return ""
    trial = next(t for t in results["trials"] if t["lms"] and t["shape"] == row["max_shape"]
                 and t["device_memory_bytes"] == row["device_memory_bytes"])
    return f"{_bytes(trial['extra'].get('predicted_host_bytes'))} (simulated)"


def _bytes(value):
    return format_bytes(value) if value else "-"


def _seconds(value):
    return f"{value:.2f} s" if value else "-"


def study_section():
    """The resolution study (`make bench-study`): Dice per region per size with its spread
    over the validation cases, the paired tests, epoch time and swapping."""
    study = load("study/study.json")
    if not study:
        return []
    sizes = [s for s in study["sizes"] if s.get("cases")]
    n = len(sizes[0]["cases"]) if sizes else 0
    lines = ["## Does a higher resolution pay off? (`make bench-study`)", "",
             f"`lmstrain study configs/study.yaml --sizes 32,48,64 --device-memory 256MiB`: "
             f"the demo's network on 40 synthetic 128^3 cases with fine structure (`lmstrain "
             f"synth --detail fine`), {study['config']['train']['epochs']} epochs, "
             f"{study['options']['repeats']} seed(s) per size, scored on the original 128^3 "
             f"grid over {n} validation cases. Dice: mean, median [interquartile range] over "
             "the cases.", "",
             "| size | voxels | swapping | predicted peak | epoch time | WT Dice | TC Dice | "
             "ET Dice | label round trip WT / TC / ET |", "|---|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        cells = []
        for region in ("wt", "tc", "et"):
            q1, q3 = np.percentile([c[f"dice_{region}"] for c in size["cases"].values()],
                                   (25, 75))
            d = size["summary"][f"dice_{region}"]
            cells.append(f"{d['mean']:.3f}, {d['median']:.3f} [{q1:.3f}-{q3:.3f}]")
        decision = size["decision"]
        lines.append(f"| {'x'.join(map(str, size['shape']))} | {size['voxels']:,} | "
                     f"{'on' if decision['swapping'] else 'off'} | "
                     f"{_bytes(decision['predicted_peak_bytes'])} | "
                     f"{_seconds(size['epoch_time_s'])} | " + " | ".join(cells) + " | "
                     + " / ".join(f"{size['label_round_trip'][f'dice_{r}']:.3f}"
                                  for r in ("wt", "tc", "et")) + " |")
    lines += ["", "Paired comparison of Dice per case (Wilcoxon signed-rank, scipy):", "",
              "| sizes | region | mean difference | p | verdict |", "|---|---|---|---|---|"]
    for c in study["comparisons"]:
        p = f"{c['p_value']:.3g}" if c["p_value"] is not None else "-"
        lines.append(f"| {c['larger']} vs {c['smaller']} | {c['region'].upper()} | "
                     f"{c['mean_difference']:+.3f} | {p} | {c['verdict']} |")
    why = "; ".join(f"{s['size']}: {s['decision']['why']}" for s in sizes)
    lines += ["", "Measured on this 2-core CPU: Dice and HD95 from `lmstrain evaluate` on each "
              "run's validation cases, epoch time the median over epochs after the first "
              "(training and validation, wall clock, from `history.csv`). Predicted peaks "
              "are the simulator's (not measured; on a CPU the budget is not enforced during "
              "`fit`). Label round trip: the mean Dice of each validation case's own "
              "segmentation taken to the size's grid and back, as training labels and "
              "predictions are (the same cases, no network): what a network reproducing its "
              "thresholded training labels would score; a network's soft predictions can "
              f"score more. Swap decisions: {why}. `dice.png` and `epoch_time.png` in "
              "`results/study/`.", ""]
    return lines


def measured_section(name, title):
    """The section of a result file that carries its own ``markdown`` table and ``measure``
    text; no lines when the file is missing."""
    result = load(name)
    if not result:
        return []
    return [f"## {title}", "", result["markdown"], "", result["measure"], ""]


def main():
    lines = ["# Benchmarks", "",
             "Generated by `scripts/bench_report.py` from `bench/results/` (`make bench-all`). "
             "Each figure says how it was obtained.", ""]
    pipeline = load("pipeline.json")
    if pipeline:
        lines += ["## Input pipeline (`make bench-pipeline`)", "",
                  f"- raw NIfTI load + preprocess: **{pipeline['raw_volumes_per_s']} volumes/s**; "
                  f"cached: **{pipeline['cached_volumes_per_s']} volumes/s** "
                  f"({pipeline['speedup']}x) at {pipeline['size']}^3",
                  f"- {pipeline['measure']}", ""]
    effect = load("lms_effect.json")
    if effect:
        lines += ["## Swapping on CPU (`make bench-lms`)", "",
                  "| size | device peak without | with | reduction | step time ratio |",
                  "|---|---|---|---|---|"]
        for size, r in effect["sizes"].items():
            lines.append(
                f"| {size} | {format_bytes(r['device_peak_bytes_without_lms']['median'])} | "
                f"{format_bytes(r['device_peak_bytes_with_lms']['median'])} | "
                f"{r['reduction']['median']:.0%} | {r['step_time_ratio']['median']:.2f} |")
        lines += ["", f"Measured. Device peak: {effect['measure']['device_peak']}. Step time: "
                      f"{effect['measure']['step_time_ratio']}.", ""]
    lines += ["## Largest trainable size (`make bench-maxres`)", ""]
    lines += maxres_section(
        "Measured on CPU", load("maxres-cpu/results.json"),
        "Measured on this project's 2-core x86_64 CPU machine (configs/demo.yaml network, "
        "batch 1), real training trials in subprocesses: without swapping the BFC allocator is "
        "capped at the budget and a trial fails with ResourceExhaustedError; with swapping the "
        "trial runs uncapped in deepcopy mode and fits when the compute device's share (state "
        "held between steps plus the profiler-replayed step peak) is within the budget.")
    lines += maxres_section(
        "Measured on CPU, with `model.split_concat: true`", load("maxres-cpu-split/results.json"),
        "As above, in its own sweep (its own no-swap maximum): the same network with each "
        "decoder concatenation's following convolution computed as the sum of two "
        "convolutions (`--set model.split_concat=true`), so no concatenated tensor exists.")
    lines += maxres_section(
        "Measured on CPU, with `model.split_concat: true` and `model.norm: instance_lean`",
        load("maxres-cpu-split-lean/results.json"),
        "As above, in its own sweep (its own no-swap maximum): the split form with each "
        "instance normalisation's gradient computed in three full-size tensors instead of "
        "four (`lmstrain.model.layers.InstanceNormalization`, the same layer "
        "mathematically).")
    lines += maxres_section(
        "Simulated for BraTS-size training", load("maxres-sim/results.json"),
        "Simulated, not measured (`--mode simulate --executor gpu`, "
        "configs/brats2021_isensee.yaml, swap settings auto-tuned per size and budget): "
        "predicted allocator peaks of the traced training step under a GPU executor's order; "
        "the simulator is validated on CPU (CPU executor order) against measured peaks "
        "(bench/results/simulator_accuracy.json), the GPU order has not been checked on a GPU. "
        "Host memory is not a limit here (the GPU machine's RAM is unknown); the host memory "
        "the swapped tensors need is reported. The element-count limit is a tensor over "
        "2^31-1 elements (cuDNN). TFLMS published 2.4x (talk) and 5.6x (2019 paper) on a "
        "3D U-Net.")
    lines += maxres_section(
        "Simulated for BraTS-size training, with `model.split_concat: true` and "
        "`model.norm: instance_lean`", load("maxres-sim-split-lean/results.json"),
        "As above (simulated, not measured; GPU executor order), in its own sweep with its "
        "own no-swap maximum: configs/brats2021_isensee.yaml with "
        "`--set model.split_concat=true --set model.norm=instance_lean`.")
    overhead = load("overhead.json")
    if overhead:
        lines += ["## Swap overhead (`make bench-overhead`)", "", overhead["summary_markdown"], ""]
    lines += measured_section("recompute.json",
                              "Recomputing instead of copying (`make bench-recompute`)")
    lines += measured_section("lean_norm.json",
                              "Instance normalisation's leaner gradient (`make bench-lean-norm`)")
    lines += measured_section("update_order.json",
                              "Each weight's update as soon as its gradient is there "
                              "(`make bench-update-order`)")
    peers = load("peers/results.json")
    if peers:
        lines += ["## Swapping and its peers (`make bench-peers`)", "",
                  f"{peers['config']}, batch {peers['batch']}, "
                  f"{format_bytes(peers['device_memory_bytes'])}, sizes {peers['sizes']}: each "
                  "peer's largest size searched as `lmstrain maxres` searches (real training "
                  "trials through the trial harness; `results/peers/<peer>/` holds each "
                  "sweep's trials).", "", peers["markdown"], "",
                  f"FLOPs: {peers['flops']}. Bytes copied: {peers['swapped_bytes']}. Step "
                  "times: median of two timed steps after two warm-up steps, as the maxres "
                  "trials run them (without swapping tf.data prefetches the batch; with "
                  "swapping each batch is built inside the step and the step is profiled). "
                  "Peaks of identical trials differ by a few percent between processes (the "
                  "op order varies): see the RematScope modes' trials beside the table's."]
        lines += [f"- `{source}`: {how}" for source, how in sorted(peers["measure"].items())]
        lines += [""]
    lines += study_section()
    lines += measured_section("distribute.json",
                              "Several replicas on logical CPUs (`make bench-distribute`)")
    accuracy = load("simulator_accuracy.json")
    if accuracy:
        worst = accuracy["summary"]["max_abs_error_held_out"]
        lines += ["## Simulator accuracy (`make bench-sim`)", "",
                  f"Held-out cases (the paper's network): largest error {worst['op_output']:.1%} "
                  f"on op outputs (target 5%), {worst['allocator']:.1%} on the allocator peak "
                  "(target 10%). See `results/simulator_accuracy.json`: predicted vs measured "
                  "peaks per case, each with what was measured and how.", ""]
    model = load("simulator_mobilenetv2.json")
    if model:
        verdict = {True: "within", False: "**outside**"}
        lines += [f"A model this project did not write, {model['model']}, batch "
                  f"{model['batch']}, through `lmstrain.lms.sim.estimate_model` (CPU order), "
                  f"against a measured step: op outputs {model['op_output']['error']:+.1%} "
                  f"({verdict[model['op_output']['within_target']]} 5%), allocator peak "
                  f"{model['allocator']['error']:+.1%} "
                  f"({verdict[model['allocator']['within_target']]} 10%); activations are "
                  f"{model['activations_share']['value']:.0%} of the predicted op-output peak "
                  "(`results/simulator_mobilenetv2.json`).", ""]
    write_text(ROOT / "README.md", "\n".join(lines))
    print(f"wrote {ROOT / 'README.md'}")


if __name__ == "__main__":
    main()
