"""Run directories: exclusive creation and atomic reads and writes of the files in them.

A run directory ``<output.root>/<output.name>-<timestamp>/`` holds::

    config.yaml             the resolved config (absolute paths)
    split.json              training and validation case ids
    checkpoints/last.keras  weights + optimizer state after the last finished epoch
    checkpoints/best.keras  the epoch with the best validation mean dice
    checkpoints/state.json  epochs completed and the best epoch (what --resume continues from)
    history.csv             one row per epoch
    tensorboard/            TensorBoard logs
    progress.png            loss and dice per epoch
    summary.json            epochs, best and final metrics, wall time
    lms_plan.json           the swap plan, when lms.enabled

Every file is written to a temporary name and renamed into place, so a killed run never
leaves a half-written checkpoint.
"""

import csv
import json
import shutil
from datetime import datetime
from pathlib import Path

from lmstrain.atomic import atomic_path, write_text
from lmstrain.data.brats import REGIONS
from lmstrain.errors import RunError

METRICS = ("loss", *(f"dice_{r}" for r in (*REGIONS, "mean")))
HISTORY_COLUMNS = ("epoch", *METRICS, *(f"val_{m}" for m in METRICS))


def create_run_dir(output_root, name):
    """Create ``<output_root>/<name>-<timestamp>`` exclusively; a clash gets a ``-2`` suffix."""
    output_root = Path(output_root)
    output_root.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    for attempt in range(1, 1000):
        run_dir = output_root / (stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        (run_dir / "checkpoints").mkdir()
        return run_dir
    raise RunError(f"could not create a new run directory under {output_root}")


class RunFiles:
    """The files of one run directory."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.checkpoints = self.run_dir / "checkpoints"

    def write_json(self, name, data):
        write_text(self.run_dir / name, json.dumps(data, indent=2) + "\n")

    def read_json(self, name, default=None):
        path = self.run_dir / name
        return json.loads(path.read_text()) if path.exists() else default

    def read_history(self, epochs):
        """History rows of the first ``epochs`` epochs (later rows came from a killed epoch)."""
        path = self.run_dir / "history.csv"
        if not path.exists():
            return []
        with path.open(newline="") as handle:
            return [row for row in csv.DictReader(handle) if int(row["epoch"]) <= epochs]

    def write_history(self, rows):
        with atomic_path(self.run_dir / "history.csv") as tmp, tmp.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def save_model(self, model, name):
        with atomic_path(self.checkpoints / name) as tmp:
            model.save(tmp)

    def copy_checkpoint(self, source, target):
        with atomic_path(self.checkpoints / target) as tmp:
            shutil.copyfile(self.checkpoints / source, tmp)
