"""A study's results: what each run measured, per size over its runs, and paired comparisons
between sizes (Wilcoxon signed-rank over the validation cases, scipy).

Scores come from each run's ``evaluation/metrics.csv`` (predictions on the original grid);
with several seeds per size a case's score is its mean over the seeds. HD95 is null in JSON
where exactly one of prediction and truth was empty (infinite).
"""

import csv
import math
from pathlib import Path

import numpy as np
from scipy import stats

from lmstrain.atomic import atomic_path
from lmstrain.data.brats import REGIONS
from lmstrain.evaluation.scoring import COLUMNS, summarise
from lmstrain.report import plot_study_dice, plot_study_time
from lmstrain.training.rundir import RunFiles

MIN_CASES = 10  # fewer paired cases leave the signed-rank test without power
ALPHA = 0.05
SCORES = COLUMNS[1:]  # dice_wt, ..., sensitivity_et


def epochs_done(run_dir: Path) -> int:
    """Epochs the run in ``run_dir`` has committed (0 without ``state.json``)."""
    files = RunFiles(run_dir)
    return files.read_state()["epoch"] if (files.checkpoints / "state.json").exists() else 0


def run_result(run_dir: Path) -> dict:
    """What a trained and evaluated run measured: its epoch times, its memory record and each
    validation case's scores."""
    files = RunFiles(run_dir)
    memory = files.read_json("summary.json", {}).get("memory", {})
    times = [float(r["time_s"]) for r in files.read_history(epochs_done(run_dir))
             if r.get("time_s")]
    with (Path(run_dir) / "evaluation" / "metrics.csv").open(newline="") as handle:
        cases = {row["case_id"]: {k: _finite_or_none(float(row[k])) for k in SCORES}
                 for row in csv.DictReader(handle)}
    return {"run_dir": str(run_dir),
            # the first epoch also traces the step (and rewrites it when swapping)
            "epoch_time_s": float(np.median(times[1:] or times)) if times else None,
            "epoch_times_s": times,
            "swapping": memory.get("swapping"),
            "predicted_peak_bytes": memory.get("predicted_peak_bytes"),
            "measured_peak_bytes": memory.get("measured_peak_bytes"),
            "measured": memory.get("measured"),
            "cases": cases}


def size_result(runs: list[dict]) -> dict:
    """One size over its finished runs: per-case scores (mean over seeds), their mean and
    median per metric, the median epoch time and the measured peak."""
    finished = [r for r in runs if r["status"] == "finished"]
    result = {"runs_finished": len(finished), "runs_failed": len(runs) - len(finished)}
    if not finished:
        return result
    cases = {case_id: {k: _mean([_inf_if_none(r["cases"][case_id][k]) for r in finished])
                       for k in SCORES}
             for case_id in finished[0]["cases"]}
    measured = [r["measured_peak_bytes"] for r in finished if r["measured_peak_bytes"]]
    times = [r["epoch_time_s"] for r in finished if r["epoch_time_s"] is not None]
    return {**result,
            "epoch_time_s": float(np.median(times)) if times else None,
            "measured_peak_bytes": max(measured) if measured else None,
            "measured": finished[0]["measured"],
            "summary": summarise([{"case_id": c, **v} for c, v in cases.items()]),
            "cases": {c: {k: _finite_or_none(v) for k, v in values.items()}
                      for c, values in cases.items()}}


def round_trip_result(cases: dict | None) -> dict | None:
    """A size's label round trip: the mean per region over the validation cases, and each case's."""
    if not cases:
        return None
    return {**{f"dice_{r}": float(np.mean([c[f"dice_{r}"] for c in cases.values()]))
               for r in REGIONS}, "cases": cases}


def paired_comparison(smaller: dict[str, float], larger: dict[str, float]) -> dict:
    """Whether ``larger``'s per-case scores differ from ``smaller``'s beyond noise: the
    Wilcoxon signed-rank test over the cases both scored.

    >>> a = {f"c{i}": 0.5 for i in range(12)}
    >>> b = {f"c{i}": 0.5 + 0.01 * (i + 1) for i in range(12)}
    >>> paired_comparison(a, b)["verdict"], paired_comparison(a, a)["verdict"]
    ('larger size better', 'no difference beyond noise')
    >>> paired_comparison({"c": 0.5}, {"c": 0.6})["verdict"]
    'too few cases'
    """
    common = sorted(set(smaller) & set(larger))
    diffs = np.array([larger[c] - smaller[c] for c in common], dtype=float)
    result = {"n_cases": len(common),
              "mean_difference": float(diffs.mean()) if diffs.size else None,
              "median_difference": float(np.median(diffs)) if diffs.size else None,
              "p_value": None}
    if len(common) < MIN_CASES:
        result["verdict"] = "too few cases"
        return result
    p = float(stats.wilcoxon(diffs).pvalue) if diffs.any() else 1.0
    result["p_value"] = p
    if p >= ALPHA:
        result["verdict"] = "no difference beyond noise"
    else:
        result["verdict"] = "larger size better" if np.median(diffs) > 0 else "larger size worse"
    return result


def comparisons(sizes: list[dict]) -> list[dict]:
    """Dice of each size against the next smaller one with results (and the smallest against
    the largest when more than two have results), per region."""
    done = [s for s in sizes if s.get("cases")]
    pairs = list(zip(done, done[1:]))
    if len(done) > 2:
        pairs.append((done[0], done[-1]))
    found = []
    for small, large in pairs:
        for region in REGIONS:
            key = f"dice_{region}"
            found.append({"smaller": small["size"], "larger": large["size"], "region": region,
                          **paired_comparison({c: v[key] for c, v in small["cases"].items()},
                                              {c: v[key] for c, v in large["cases"].items()})})
    return found


SUMMARY_SCORES = tuple(f"{m}_{r}" for m in ("dice", "hd95") for r in REGIONS)
SIZE_COLUMNS = ("size", "shape", "voxels", "swapping", "predicted_peak_bytes",
                "measured_peak_bytes", "epoch_time_s", "runs_finished", "runs_failed",
                "n_cases", *(f"{k}_{s}" for k in SUMMARY_SCORES for s in ("mean", "median")),
                *(f"round_trip_dice_{r}" for r in REGIONS))
CASE_COLUMNS = ("size", "seed", "case_id", *SCORES)


def write_tables(record: dict, out_dir: Path) -> None:
    """``study.csv`` (a row per size), ``cases.csv`` (a row per run and case) and the plots."""
    out_dir = Path(out_dir)
    rows, case_rows = [], []
    for size in record["sizes"]:
        decision = size["decision"] or {}
        row = {"size": size["size"], "shape": "x".join(map(str, size["shape"])),
               "voxels": size["voxels"], "swapping": decision.get("swapping"),
               "predicted_peak_bytes": decision.get("predicted_peak_bytes"),
               "measured_peak_bytes": size.get("measured_peak_bytes"),
               "epoch_time_s": size.get("epoch_time_s"), "runs_finished": size["runs_finished"],
               "runs_failed": size["runs_failed"]}
        trip = size.get("label_round_trip")
        if trip:
            row.update({f"round_trip_dice_{r}": trip[f"dice_{r}"] for r in REGIONS})
        summary = size.get("summary")
        if summary:
            row["n_cases"] = summary["n_cases"]
            row.update({f"{k}_{s}": summary[k][s] for k in SUMMARY_SCORES
                        for s in ("mean", "median")})
        rows.append(row)
        for run in size["runs"]:
            for case_id, scores in run.get("cases", {}).items():
                case_rows.append({"size": size["size"], "seed": run["seed"], "case_id": case_id,
                                  **scores})
    _write_csv(out_dir / "study.csv", SIZE_COLUMNS, rows)
    _write_csv(out_dir / "cases.csv", CASE_COLUMNS, case_rows)
    done = [s for s in record["sizes"] if s.get("cases")]
    if done:
        plot_study_dice(done, out_dir / "dice.png")
        plot_study_time(done, out_dir / "epoch_time.png")


def _write_csv(path, columns, rows):
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)


def _cell(value):
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def _mean(values):
    return float(np.mean(values))  # inf when a seed's HD95 was infinite


def _finite_or_none(value):
    return value if math.isfinite(value) else None


def _inf_if_none(value):
    return math.inf if value is None else value

