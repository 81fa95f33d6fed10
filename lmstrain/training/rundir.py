"""Run directories: exclusive creation, a lock, and atomic reads and writes of their files.

A run directory ``<output.root>/<output.name>-<timestamp>/`` holds::

    config.yaml                  the resolved config (absolute paths)
    split.json                   training and validation case ids
    checkpoints/epoch-NNNN.keras weights + optimizer state after epoch NNNN (the last finished
                                 epoch's, and the best epoch's while it is the best)
    checkpoints/state.json       THE commit point: epochs completed, the checkpoint of the last
                                 one and of the best one (what --resume continues from)
    checkpoints/last.keras       the same file as state.json's checkpoint (a hard link)
    checkpoints/best.keras       the same file as state.json's best_checkpoint
    history.csv                  one row per epoch: losses, dice, the epoch's wall time with
                                 validation (rows after state.json's epoch are ignored)
    tensorboard/                 TensorBoard logs
    progress.png                 loss and dice per epoch
    summary.json                 epochs, best and final metrics, wall time
    lms_plan.json                the swap plan, when lms.enabled
    .lock                        held (flock) by the one process writing the run; its pid

Every file is written to a temporary name and renamed into place. An epoch is saved as its
own checkpoint file, then history.csv, then one atomic write of state.json that names it: a
run killed at any moment resumes from exactly the epochs state.json names, and files of an
epoch it does not name are removed.
"""

import csv
import json
import os
import shutil
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from lmstrain import locking
from lmstrain.atomic import atomic_path, write_text
from lmstrain.data.brats import REGIONS
from lmstrain.errors import RunError, UserError

METRICS = ("loss", *(f"dice_{r}" for r in (*REGIONS, "mean")))
LOGGED = (*METRICS, *(f"val_{m}" for m in METRICS))  # what Keras logs per epoch
HISTORY_COLUMNS = ("epoch", *LOGGED, "time_s")




@contextmanager
def writing(path):
    """Turn an OSError while writing ``path`` (disk full, read-only, no permission) into a
    one-line :class:`RunError` naming it."""
    try:
        yield
    except OSError as err:
        raise RunError(f"cannot write {path}: {err.strerror or err}; free space on its disk or "
                       "set output.root to a writable folder") from None


def check_output_root(output_root) -> None:
    """Before any work: raise :class:`UserError` unless run directories can be created in
    ``output_root`` (its nearest existing folder must be a writable folder)."""
    output_root = Path(output_root)
    existing = next(p for p in (output_root, *output_root.parents) if p.exists())
    if not existing.is_dir():
        where = "" if existing == output_root else f": {existing}"
        raise UserError(f"output.root {output_root}{where} is a file, not a folder; set "
                        "output.root to a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output.root {output_root}: {existing} is read-only or not writable by "
                        "you; set output.root to a writable folder")


def create_run_dir(output_root, name):
    """Create ``<output_root>/<name>-<timestamp>`` exclusively; a clash gets a ``-2`` suffix."""
    output_root = Path(output_root)
    stem = f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    with writing(output_root):
        output_root.mkdir(parents=True, exist_ok=True)
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
        with writing(self.run_dir / name):
            write_text(self.run_dir / name, json.dumps(data, indent=2) + "\n")

    def read_json(self, name, default=None):
        path = self.run_dir / name
        return json.loads(path.read_text()) if path.exists() else default

    def read_state(self):
        """The committed state (``epoch``, ``checkpoint``, ``best_epoch``, ``best_value``,
        ``best_checkpoint``), or None before the first finished epoch."""
        state = self.read_json("checkpoints/state.json")
        if state is not None:  # runs saved before epoch-named checkpoints name none
            state.setdefault("checkpoint", "last.keras")
            state.setdefault("best_checkpoint", "best.keras" if state["best_epoch"] else None)
        return state

    def commit(self, state):
        """Write ``state`` (naming the epoch's checkpoints): the one atomic step that makes an
        epoch count."""
        self.write_json("checkpoints/state.json", state)

    def publish(self, state):
        """Make last.keras and best.keras the checkpoints ``state`` names, and remove every
        other epoch's checkpoint and the temporary files of killed writes."""
        for name, source in (("last.keras", state["checkpoint"]),
                             ("best.keras", state["best_checkpoint"])):
            if source and source != name:
                with writing(self.checkpoints / name), \
                        atomic_path(self.checkpoints / name) as tmp:
                    tmp.unlink()
                    try:
                        os.link(self.checkpoints / source, tmp)
                    except OSError:  # a file system without hard links
                        shutil.copyfile(self.checkpoints / source, tmp)
        keep = {state["checkpoint"], state["best_checkpoint"]}
        for path in [*self.checkpoints.glob("epoch-*.keras"), *self.checkpoints.glob(".*")]:
            if path.name not in keep:
                path.unlink(missing_ok=True)

    @contextmanager
    def lock(self):
        """Hold the run directory's exclusive lock: one process writes a run at a time."""
        with locking.exclusive(self.run_dir, "lmstrain process"):
            yield

    def read_history(self, epochs):
        """History rows of the first ``epochs`` epochs (later rows came from a killed epoch)."""
        path = self.run_dir / "history.csv"
        if not path.exists():
            return []
        with path.open(newline="") as handle:
            return [row for row in csv.DictReader(handle) if int(row["epoch"]) <= epochs]

    def write_history(self, rows):
        path = self.run_dir / "history.csv"
        with writing(path), atomic_path(path) as tmp, tmp.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def save_model(self, model, name):
        with writing(self.checkpoints / name), atomic_path(self.checkpoints / name) as tmp:
            model.save(tmp)
