"""Text tables of the ``plan``, ``maxres`` and ``study`` results, rendered at the edge from the
library's JSON-ready dicts."""

from lmstrain.data.brats import REGIONS
from lmstrain.planning.sweep import swap_gain
from lmstrain.units import format_bytes


def plan_lines(report: dict, config_name: str = "") -> list[str]:
    """The report as lines of text."""
    r = report
    shape = "x".join(map(str, r["shape"]))
    budget = format_bytes(r["device_memory_bytes"]) if r["device_memory_bytes"] else "unknown"
    host = (format_bytes(r["host_memory_bytes"]) if r["host_memory_bytes"]
            else "not limited (pass --host-memory)")
    lines = [f"{config_name}: input {shape}, batch {r['batch']} per device (per replica); device "
             f"memory {budget}, host "
             f"memory {host}; {r['executor'].upper()} executor order emulated",
             "",
             f"At {shape}, batch {r['batch']}:{'without swapping':>30}{'with swapping':>18}"]
    parts = dict.fromkeys(list(r["breakdown_without_swap"]) + list(r["breakdown_with_swap"]))
    for part in parts:
        lines.append(f"  {part:<40}{_b(r['breakdown_without_swap'].get(part, 0)):>18}"
                     f"{_b(r['breakdown_with_swap'].get(part, 0)):>18}")
    lines += [
        f"  {'op-output peak':<40}{_b(r['op_output_peak_bytes_without_swap']):>18}"
        f"{_b(r['op_output_peak_bytes_with_swap']):>18}",
        f"  {'allocator peak (predicted)':<40}{_b(r['peak_bytes_without_swap']):>18}"
        f"{_b(r['peak_bytes_with_swap']):>18}",
        f"  peak op without swapping: {r['peak_op_without_swap']}",
        f"  peak op with swapping:    {r['peak_op_with_swap']}",
        f"  swapped per step: {_b(r['swapped_bytes_per_step'])}, held in host memory at most "
        f"{_b(r['host_bytes_with_swap'])}",
        f"  physical bound (weights, optimizer state, gradients, batch and the largest single "
        f"op): {_b(r['bound_bytes'])}, set by {r['bound_op']}",
        f"  physical bound with the plan's swaps (a swapped batch is not resident): "
        f"{_b(r['bound_bytes_with_swap'])}, set by {r['bound_op_with_swap']}",
        f"  largest tensor: {r['largest_tensor']} ({r['largest_tensor_elements']:,} elements); "
        f"tensors exceed 2^31-1 elements from size "
        f"{r['element_limit_size'] or 'beyond the search range'}",
        ""]
    if not r["device_memory_bytes"]:
        lines.append("Largest sizes: pass --device-memory (or set lms.device_memory) to search.")
        return lines
    lines.append(f"Largest size in {budget}:")
    for suffix, label in (("without", "without swapping"), ("with", "with swapping")):
        size = r[f"max_size_{suffix}_swap"]
        limit = r["limited_by_without_swap" if suffix == "without" else "limited_by"]
        if size is None:
            lines.append(f"  {label + ':':<19} nothing fits ({limit})")
            continue
        lines.append(f"  {label + ':':<19} {'x'.join(map(str, r[f'max_shape_{suffix}_swap']))} "
                     f"({r[f'max_voxels_{suffix}_swap']:,} voxels); the next size is stopped by "
                     f"{limit}")
    if r["max_size_swap_settings"]:
        s = r["max_size_swap_settings"]
        lines.append(f"  auto-tuned at that size: swapout_threshold={s['swapout_threshold']}, "
                     f"swapin_ahead={s['swapin_ahead']}, swapin_groupby={s['swapin_groupby']}; "
                     f"host memory needed {_b(r['max_size_host_bytes'])}")
    if r["voxel_ratio"]:
        lines.append(f"  voxel ratio (with / without swapping): {r['voxel_ratio']:.2f}x")
    return lines


def _b(n):
    return format_bytes(n) if n is not None else "-"


def maxres_table(summary: list[dict]) -> str:
    """The summary as a text table, with :func:`swap_gain` per budget and batch and,
    with swapping, the host memory the swapped tensors need (predicted)."""
    header = (f"{'budget':>10} {'batch':>5} {'swap':>4} {'max size':>8} {'shape':>14} "
              f"{'voxels':>12} {'ratio':>6} {'host':>10}  limited by")
    lines = [header, "-" * len(header)]
    for row in summary:
        gain = swap_gain(summary, row)
        ratio = f"{gain:.2f}x" if gain else ""
        shape = "x".join(map(str, row["max_shape"])) if row["max_shape"] else "-"
        batch = row.get("max_batch", row["batch"])
        host = format_bytes(row["predicted_host_bytes"]) if row.get("predicted_host_bytes") \
            else ""
        lines.append(f"{format_bytes(row['device_memory_bytes']):>10} {batch!s:>5} "
                     f"{'on' if row['lms'] else 'off':>4} {row['max_size'] or '-':>8} "
                     f"{shape:>14} {row['max_voxels'] or '-':>12} {ratio:>6} {host:>10}  "
                     f"{row['limited_by'] or ''}")
    lines.append("Sizes, batches and budgets are per device: under train.distribute: mirrored "
                 "each GPU holds one replica at this batch.")
    return "\n".join(lines)


def study_table(record: dict) -> str:
    """Per size: swapping, peaks, epoch time and Dice per region (mean / median over the
    validation cases); then the paired comparisons."""
    header = (f"{'size':>4} {'shape':>12} {'voxels':>11} {'swap':>4} {'pred. peak':>10} "
              f"{'meas. peak':>10} {'epoch (s)':>9}"
              + "".join(f" {r.upper() + ' dice mean/med':>18}" for r in REGIONS))
    lines = [header, "-" * len(header)]
    for size in record["sizes"]:
        decision = size["decision"] or {}
        swap = {True: "on", False: "off"}.get(decision.get("swapping"), "-")
        time = f"{size['epoch_time_s']:.1f}" if size.get("epoch_time_s") is not None else "-"
        cells = ""
        if size.get("summary"):
            for region in REGIONS:
                d = size["summary"][f"dice_{region}"]
                cells += f" {d['mean']:>11.3f}/{d['median']:<6.3f}"
        else:
            failed = [r for r in size["runs"] if r["status"] == "failed"]
            cells = f"  failed: {failed[0]['error']}" if failed else "  not run"
        lines.append(f"{size['size']:>4} {'x'.join(map(str, size['shape'])):>12} "
                     f"{size['voxels']:>11,} {swap:>4} "
                     f"{_b(decision.get('predicted_peak_bytes')):>10} "
                     f"{_b(size.get('measured_peak_bytes')):>10} {time:>9}{cells}")
    trips = [s for s in record["sizes"] if s.get("label_round_trip")]
    if trips:
        lines += ["", "Label round trip (each validation segmentation taken to the size's grid "
                      "and back: what a network reproducing its thresholded training labels "
                      "would score), mean Dice:"]
        for s in trips:
            dice = s["label_round_trip"]
            lines.append(f"  {s['size']:>4}  " + "  ".join(f"{r.upper()} {dice[f'dice_{r}']:.3f}"
                                                           for r in REGIONS))
    if record["comparisons"]:
        n = record["comparisons"][0]["n_cases"]
        lines += ["", f"Paired comparison of Dice (Wilcoxon signed-rank over {n} validation "
                      "cases; mean difference, p):"]
        for c in record["comparisons"]:
            p = f"p={c['p_value']:.3g}" if c["p_value"] is not None else "no p"
            lines.append(f"  {c['larger']:>4} vs {c['smaller']:<4} {c['region'].upper():<3} "
                         f"{c['mean_difference']:+.3f}  {p:<10} {c['verdict']}")
    return "\n".join(lines)
