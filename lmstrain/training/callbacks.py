"""Keras callbacks of a training run: the run recorder and a tqdm progress bar per epoch."""

import logging
import math
import time

import keras
from tqdm import tqdm

from lmstrain.report import plot_history
from lmstrain.training.rundir import HISTORY_COLUMNS

log = logging.getLogger("lmstrain.training.fit")

MONITOR = "val_dice_mean"


class RunRecorder(keras.callbacks.Callback):
    """After each epoch: save ``last.keras`` (and ``best.keras``), history, state, plot, summary.

    Stops training at the first non-finite loss and then saves nothing, so the last checkpoint
    stays the last good one. ``nan_epoch`` tells which epoch it happened in.
    """

    def __init__(self, files, summary):
        super().__init__()
        self.files = files
        self.state = files.read_json("checkpoints/state.json",
                                     {"epoch": 0, "best_epoch": None, "best_value": None})
        self.history = files.read_history(self.state["epoch"])
        self.summary = summary
        self.nan_epoch = None
        self._epoch_started = None

    @property
    def epochs_completed(self):
        return self.state["epoch"]

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_started = time.time()

    def on_train_batch_end(self, batch, logs=None):
        self._stop_if_not_finite(logs, ("loss",))

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self._stop_if_not_finite(logs, ("loss", "val_loss")):
            return
        epoch_number = epoch + 1
        self.files.save_model(self.model, "last.keras")
        value = logs.get(MONITOR)
        improved = value is not None and (self.state["best_value"] is None
                                          or value > self.state["best_value"])
        if improved:
            self.files.copy_checkpoint("last.keras", "best.keras")
            self.state.update(best_epoch=epoch_number, best_value=float(value))
        self.history.append(_history_row(epoch_number, logs))
        self.files.write_history(self.history)
        self.state["epoch"] = epoch_number
        self.files.write_json("checkpoints/state.json", self.state)
        plot_history(self.history, self.files.run_dir / "progress.png")
        self._write_summary()
        log.info("epoch %d/%d (%.0fs): %s%s", epoch_number, self.params["epochs"],
                 time.time() - self._epoch_started, _format_logs(logs),
                 "  [best]" if improved else "")

    def _stop_if_not_finite(self, logs, keys):
        """Stop training at a NaN/inf loss (the weights are no longer good); True if stopped."""
        if self.nan_epoch is None and any(
                k in (logs or {}) and not math.isfinite(float(logs[k])) for k in keys):
            self.nan_epoch = self.state["epoch"] + 1
            self.model.stop_training = True
        return self.nan_epoch is not None

    def finish(self, wall_time_s):
        """Add this session's wall time and write the final summary."""
        self.summary["wall_time_s"] = round(self.summary.get("wall_time_s", 0.0) + wall_time_s, 1)
        self._write_summary()

    def _write_summary(self):
        rows = {int(r["epoch"]): r for r in self.history}
        best = self.state["best_epoch"]
        self.summary.update(
            epochs_completed=self.state["epoch"],
            best_epoch=best,
            best_metrics=_numbers(rows[best]) if best else None,
            final_metrics=_numbers(self.history[-1]) if self.history else None,
        )
        self.files.write_json("summary.json", self.summary)


class EpochProgress(keras.callbacks.Callback):
    """A tqdm bar over the training steps of each epoch, showing the running loss."""

    def __init__(self, steps):
        super().__init__()
        self.steps = steps
        self.bar = None

    def on_epoch_begin(self, epoch, logs=None):
        self.bar = tqdm(total=self.steps, desc=f"epoch {epoch + 1}/{self.params['epochs']}",
                        unit="step", leave=False, disable=None)

    def on_train_batch_end(self, batch, logs=None):
        self.bar.update(batch + 1 - self.bar.n)
        if logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}")

    def on_epoch_end(self, epoch, logs=None):
        self.bar.close()


def _history_row(epoch, logs):
    row = {"epoch": epoch}
    for key in HISTORY_COLUMNS[1:]:
        row[key] = f"{float(logs[key]):.6g}" if key in logs else ""
    return row


def _numbers(row):
    return {k: float(v) for k, v in row.items() if k != "epoch" and v != ""}


def _format_logs(logs):
    keys = ("loss", "dice_mean", "val_loss", "val_dice_wt", "val_dice_tc", "val_dice_et",
            "val_dice_mean")
    return " ".join(f"{k} {float(logs[k]):.4f}" for k in keys if k in logs)
