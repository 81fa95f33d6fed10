"""Score a trained run: predict its validation cases (or a given folder) and compare.

Writes ``metrics.csv`` (one row per case: Dice, HD95 in mm and sensitivity per region),
``summary.json`` (mean and median per metric) and ``boxplot.png`` into an evaluation folder,
and on request the scored segmentations (``predictions/<case_id>.nii.gz``).
"""

import csv
import json
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmstrain.atomic import atomic_path, write_text
from lmstrain.config import require_data_root
from lmstrain.data.brats import REGIONS, discover_cases
from lmstrain.data.preprocess import crop_to_brain, load_case, network_regions, restore
from lmstrain.data.split import load_split
from lmstrain.errors import DataError, RunError
from lmstrain.evaluation.inference import Predictor, nested, require_writable, write_segmentation
from lmstrain.evaluation.metrics import METRICS, dice, score_regions
from lmstrain.report import plot_scores

COLUMNS = ("case_id", *(f"{m}_{r}" for m in METRICS for r in REGIONS))


def evaluate_run(run_dir, data_dir=None, save_predictions: bool = False):
    """Score ``run_dir`` on its validation cases, or on every case in ``data_dir``.

    Returns ``(rows, summary, out_dir)``; results go to ``RUN_DIR/evaluation`` (or
    ``RUN_DIR/evaluation-<folder name>`` for ``data_dir``). ``save_predictions`` also writes
    each scored segmentation there, on the case's grid with its affine and label values.
    """
    run_dir = Path(run_dir)
    predictor = Predictor(run_dir)
    if data_dir is None:
        cases = discover_cases(require_data_root(predictor.config), predictor.config.data.layout)
        _train, cases = load_split(run_dir / "split.json", cases)
        out_dir = run_dir / "evaluation"
    else:
        cases = discover_cases(data_dir)
        out_dir = run_dir / f"evaluation-{Path(data_dir).resolve().name}"
    unlabelled = [c.case_id for c in cases if c.seg is None]
    if unlabelled:
        raise DataError(f"cannot score cases without a segmentation: {', '.join(unlabelled[:5])}")
    require_writable(out_dir / "predictions" if save_predictions else out_dir)
    rows = []
    for case in tqdm(cases, desc="Evaluating", unit="case", disable=None):
        pred, loaded = predictor.predict_case(case)
        truth = case.layout.labels.to_regions(loaded.seg)
        rows.append({"case_id": case.case_id, **score_regions(pred, truth, loaded.spacing)})
        if save_predictions:
            target = out_dir / "predictions" / f"{case.case_id}.nii.gz"
            try:
                write_segmentation(case.layout.labels.from_regions(pred), loaded.affine, target)
            except OSError as err:
                raise RunError(f"cannot write {target}: {err.strerror or err}") from None
    summary = summarise(rows)
    with atomic_path(out_dir / "metrics.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if k != "case_id" else v) for k, v in r.items()}
                         for r in rows)
    write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    plot_scores(rows, out_dir / "boxplot.png")
    return rows, summary, out_dir


def label_round_trip(case, settings) -> dict:
    """Dice per region of ``case``'s own segmentation taken to the network grid as training
    labels are and back as predictions are (``{"dice_wt": ...}``): what a network reproducing
    its thresholded training labels at ``settings.shape`` would score. A network's soft
    predictions can score more: it is a reference, not a bound."""
    loaded = load_case(case)
    _box, seg, transform = crop_to_brain(loaded)
    labels = network_regions(case.layout.labels.to_regions(seg), settings)
    pred = nested(restore(labels.astype(np.float32), transform, settings) >= 0.5)
    truth = case.layout.labels.to_regions(loaded.seg)
    return {f"dice_{r}": dice(pred[..., i], truth[..., i]) for i, r in enumerate(REGIONS)}


def summarise(rows):
    """Mean and median of every metric column; HD95's mean is over finite values only, and
    ``n_infinite`` counts cases where exactly one of prediction and truth was empty."""
    summary = {"n_cases": len(rows)}
    for column in COLUMNS[1:]:
        values = np.array([r[column] for r in rows], dtype=float)
        finite = values[np.isfinite(values)]
        summary[column] = {
            "mean": float(finite.mean()) if finite.size else None,
            "median": float(np.median(values)) if values.size else None,
            "n_infinite": int((~np.isfinite(values)).sum()),
        }
    return summary


def format_summary(summary):
    """A small table: one line per region with Dice, HD95 and sensitivity (mean / median)."""
    lines = [f"{summary['n_cases']} cases   {'dice':>15}  {'hd95 (mm)':>15}  {'sensitivity':>15}",
             f"{'':9}{'mean / median':>17}{'mean / median':>17}{'mean / median':>17}"]
    for region in REGIONS:
        cells = []
        for metric in METRICS:
            s = summary[f"{metric}_{region}"]
            cells.append(f"{_fmt(s['mean'])} / {_fmt(s['median'])}")
        lines.append(f"{region.upper():<9}" + "".join(f"{c:>17}" for c in cells))
    return "\n".join(lines)


def _fmt(value):
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.3f}" if value < 100 else f"{value:.1f}"
