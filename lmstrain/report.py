"""Plots for runs, sweeps and studies (matplotlib, headless)."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lmstrain.atomic import atomic_path  # noqa: E402
from lmstrain.data.brats import REGIONS  # noqa: E402
from lmstrain.units import format_bytes  # noqa: E402


def plot_history(rows, path):
    """Write ``progress.png``: loss and per-region dice per epoch, training dashed."""
    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("loss", "--"), ("val_loss", "-")):
        ax_loss.plot(epochs, [_num(r.get(key)) for r in rows], style, color="k", label=key)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend()
    for region, color in zip((*REGIONS, "mean"), ("tab:green", "tab:orange", "tab:red", "k")):
        for prefix, style in (("", "--"), ("val_", "-")):
            ax_dice.plot(epochs, [_num(r.get(f"{prefix}dice_{region}")) for r in rows], style,
                         color=color, label=f"{prefix}dice_{region}")
    ax_dice.set(xlabel="epoch", ylabel="dice (threshold 0.5)", ylim=(0, 1), title="Dice")
    ax_dice.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def plot_scores(rows, path):
    """Write a boxplot of Dice and HD95 per region over the scored cases."""
    fig, (ax_dice, ax_hd) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [r.upper() for r in REGIONS]
    ax_dice.boxplot([[row[f"dice_{r}"] for row in rows] for r in REGIONS], tick_labels=labels)
    ax_dice.set(ylabel="Dice", ylim=(0, 1.02), title=f"Dice ({len(rows)} cases)")
    finite = [[row[f"hd95_{r}"] for row in rows if math.isfinite(row[f"hd95_{r}"])]
              for r in REGIONS]
    ax_hd.boxplot(finite, tick_labels=labels)
    ax_hd.set(ylabel="HD95 (mm)", title="HD95 (finite values)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_maxres(summary, path):
    """Largest trainable voxels vs device memory, one line per (batch, swapping) setting; one
    bar per setting when a single budget was swept."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    settings = sorted({(row["batch"] or 0, row["lms"]) for row in summary})
    budgets = sorted({row["device_memory_bytes"] for row in summary})

    def label(batch, swap, sep=", "):
        return f"{'with' if swap else 'without'} swapping" + (f"{sep}batch {batch}" if batch
                                                              else "")

    if len(budgets) == 1:
        voxels = {((r["batch"] or 0), r["lms"]): r["max_voxels"] or 0 for r in summary}
        ax.bar([label(*s, sep="\n") for s in settings], [voxels[s] for s in settings],
               color=["tab:blue" if swap else "tab:gray" for _batch, swap in settings])
        ax.tick_params(axis="x", labelsize=8)
        ax.set(ylabel="largest trainable voxels",
               title=f"Largest trainable size at {format_bytes(budgets[0])} device memory")
    else:
        for batch, swap in settings:
            rows = sorted((r for r in summary if (r["batch"] or 0) == batch and r["lms"] == swap),
                          key=lambda r: r["device_memory_bytes"])
            ax.plot([r["device_memory_bytes"] / 2**30 for r in rows],
                    [r["max_voxels"] or 0 for r in rows], "o-" if swap else "s--",
                    label=label(batch, swap))
        ax.set(xlabel="device memory (GiB)", ylabel="largest trainable voxels",
               title="Largest trainable size")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_step_times(trials, path):
    """Step time of each successful trial vs its largest edge, with and without swapping."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for swap in (False, True):
        ok = sorted((t for t in trials if t["lms"] == swap and t["status"] == "ok"
                     and t.get("step_time_s")), key=lambda t: (t["batch"], t["size"]))
        for batch in sorted({t["batch"] for t in ok}):
            points = [t for t in ok if t["batch"] == batch]
            ax.plot([t["size"] for t in points], [t["step_time_s"] for t in points],
                    "o-" if swap else "s--",
                    label=f"{'with' if swap else 'without'} swapping, batch {batch}")
    ax.set(xlabel="largest edge (voxels)", ylabel="step time (s)", title="Step time")
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_study_dice(sizes, path):
    """Dice per region against voxel count: each validation case a grey line across the
    sizes (its mean over seeds), the mean over cases in colour, the label round trip dashed."""
    fig, axes = plt.subplots(1, len(REGIONS), figsize=(12, 4), sharey=True)
    x = [s["voxels"] for s in sizes]
    for ax, region, color in zip(axes, REGIONS, ("tab:green", "tab:orange", "tab:red")):
        key = f"dice_{region}"
        for case_id in sizes[0]["cases"]:
            ax.plot(x, [s["cases"].get(case_id, {}).get(key, math.nan) for s in sizes], "-",
                    color="0.6", alpha=0.5, lw=0.8)
        ax.plot(x, [s["summary"][key]["mean"] for s in sizes], "o-", color=color, lw=2,
                label="mean over cases")
        if all(s.get("label_round_trip") for s in sizes):
            ax.plot(x, [s["label_round_trip"][key] for s in sizes], "--", color=color, lw=1,
                    label="label round trip (mean)")
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{s['size']}\n{s['voxels']:,}" for s in sizes], fontsize=8)
        ax.minorticks_off()
        ax.set(xlabel="largest edge / voxels", title=region.upper(), ylim=(0, 1.02))
    axes[0].set_ylabel("Dice on the original grid")
    axes[0].legend(loc="lower right", fontsize=8)
    n = len(sizes[0]["cases"])
    fig.suptitle(f"Dice against training resolution ({n} validation cases; grey: each case)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_study_time(sizes, path):
    """Median epoch time against voxel count; filled markers where the size swapped."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    points = [s for s in sizes if s.get("epoch_time_s") is not None]
    ax.plot([s["voxels"] for s in points], [s["epoch_time_s"] for s in points], "-",
            color="tab:blue")
    for swap, marker, label in ((False, "o", "without swapping"), (True, "s", "with swapping")):
        chosen = [s for s in points if bool((s["decision"] or {}).get("swapping")) == swap]
        if chosen:
            ax.plot([s["voxels"] for s in chosen], [s["epoch_time_s"] for s in chosen], marker,
                    color="tab:blue", mfc="tab:blue" if swap else "white", label=label)
    ax.set(xlabel="voxels per volume", ylabel="epoch time (s, median)",
           title="Epoch time (training and validation)")
    if points:
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path):
    """Save ``fig`` to ``path`` atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def _num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
