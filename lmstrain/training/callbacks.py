"""Keras callbacks of a training run: the run recorder and a tqdm progress bar per epoch."""

import logging
import math
import time

import keras
from tqdm import tqdm

from lmstrain.errors import RunError
from lmstrain.report import plot_history
from lmstrain.training.faults import fault_point
from lmstrain.training.rundir import LOGGED, writing

log = logging.getLogger("lmstrain.training.fit")

MONITOR = "val_dice_mean"


class RunRecorder(keras.callbacks.Callback):
    """After each epoch: save its checkpoint and history, commit state.json (the one atomic
    step that makes the epoch count), then point last.keras/best.keras at it, plot, summary.

    Stops training at the first non-finite loss and then saves nothing, so the last checkpoint
    stays the last good one. ``nan_epoch`` tells which epoch it happened in.

    ``writes`` False (a multi_worker worker other than the chief; ``files`` None or the
    chief's run directory, read only): keeps the same state in memory and writes nothing.
    """

    def __init__(self, files, summary, writes=True):
        super().__init__()
        self.files = files
        self.writes = writes
        self.state = (files and files.read_state()) or {
            "epoch": 0, "checkpoint": None, "best_epoch": None, "best_value": None,
            "best_checkpoint": None}
        self.history = files.read_history(self.state["epoch"]) if files else []
        self.summary = summary
        self.nan_epoch = None
        self._epoch_started = None

    @property
    def epochs_completed(self):
        return self.state["epoch"]

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_started = time.time()

    def on_train_batch_end(self, batch, logs=None):
        fault_point("training-step")
        self._stop_if_not_finite(logs, ("loss",))

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self._stop_if_not_finite(logs, ("loss", "val_loss")):
            return
        epoch_number = epoch + 1
        checkpoint = f"epoch-{epoch_number:04d}.keras"
        state = dict(self.state, epoch=epoch_number, checkpoint=checkpoint)
        value = logs.get(MONITOR)
        improved = value is not None and (state["best_value"] is None
                                          or value > state["best_value"])
        if improved:
            state.update(best_epoch=epoch_number, best_value=float(value),
                         best_checkpoint=checkpoint)
        seconds = time.time() - self._epoch_started
        self.history.append(_history_row(epoch_number, logs, seconds))
        if not self.writes:
            self.state = state
            log.info("epoch %d/%d: %s", epoch_number, self.params["epochs"], _format_logs(logs))
            return
        self.files.save_model(self.model, checkpoint)
        self.files.write_history(self.history)
        fault_point("epoch-files-written")
        self.files.commit(state)
        self.state = state
        fault_point("epoch-committed")
        self.files.publish(state)
        with writing(self.files.run_dir / "progress.png"):
            plot_history(self.history, self.files.run_dir / "progress.png")
        self._write_summary()
        log.info("epoch %d/%d (%.0fs): %s%s", epoch_number, self.params["epochs"], seconds,
                 _format_logs(logs),
                 "  [best]" if improved else "")

    def _stop_if_not_finite(self, logs, keys):
        """Stop training at a NaN/inf loss (the weights are no longer good); True if stopped."""
        if self.nan_epoch is None and any(
                k in (logs or {}) and not math.isfinite(float(logs[k])) for k in keys):
            self.nan_epoch = self.state["epoch"] + 1
            self.model.stop_training = True
        return self.nan_epoch is not None

    def nan_error(self, learning_rate: float, mixed_precision: bool = False) -> RunError:
        """The error for a run stopped by a non-finite loss: what was kept, and what to do."""
        last = self.files.checkpoints / "last.keras" if self.files else None
        kept = (f"the last good checkpoint, {last} (epoch {self.state['epoch']}), was kept"
                if self.state["epoch"] and last and last.exists()
                else "no epoch had finished, so no checkpoint was saved")
        advice = f"lmstrain fit CONFIG --set train.learning_rate={learning_rate / 10:g}"
        if mixed_precision:
            advice += " --set train.mixed_precision=false"
        return RunError(f"the loss became NaN in epoch {self.nan_epoch}; training stopped and "
                        f"{kept}. --resume cannot change the learning rate: start a new run with "
                        f"a lower one, e.g. `{advice}`")

    def finish(self, wall_time_s):
        """Add this session's wall time and write the final summary."""
        self.summary["wall_time_s"] = round(self.summary.get("wall_time_s", 0.0) + wall_time_s, 1)
        if self.writes:
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


def _history_row(epoch, logs, seconds):
    row = {"epoch": epoch, "time_s": f"{seconds:.2f}"}
    for key in LOGGED:
        row[key] = f"{float(logs[key]):.6g}" if key in logs else ""
    return row


def _numbers(row):
    return {k: float(v) for k, v in row.items() if k not in ("epoch", "time_s") and v != ""}


def _format_logs(logs):
    keys = ("loss", "dice_mean", "val_loss", "val_dice_wt", "val_dice_tc", "val_dice_et",
            "val_dice_mean")
    return " ".join(f"{k} {float(logs[k]):.4f}" for k in keys if k in logs)
