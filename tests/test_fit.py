"""End-to-end training runs on tiny synthetic data: artifacts, resume, kill, NaN."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import keras
from click.testing import CliRunner

from lmstrain.cli import main

ARTIFACTS = ["config.yaml", "split.json", "checkpoints/last.keras", "checkpoints/best.keras",
             "checkpoints/state.json", "history.csv", "tensorboard", "progress.png",
             "summary.json"]


def run(*args):
    result = CliRunner().invoke(main, list(map(str, args)))
    return result


def run_dirs(tmp_path):
    return sorted((tmp_path / "runs").iterdir())


def history(run_dir):
    with (run_dir / "history.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_fit_writes_every_artifact_then_resume_continues(tmp_path, tiny_config):
    path = tiny_config()
    result = run("fit", path)
    assert result.exit_code == 0, result.output
    (run_dir,) = run_dirs(tmp_path)
    assert run_dir.name.startswith("tiny-")
    for name in ARTIFACTS:
        assert (run_dir / name).exists(), name
    assert f"Run directory: {run_dir}" in result.output
    assert "Validation dice (best epoch 1 of 1): WT" in result.output
    rows = history(run_dir)
    assert list(rows[0]) == ["epoch", "loss", "dice_wt", "dice_tc", "dice_et", "dice_mean",
                             "val_loss", "val_dice_wt", "val_dice_tc", "val_dice_et",
                             "val_dice_mean", "time_s"]
    assert [r["epoch"] for r in rows] == ["1"] and all(rows[0].values())
    assert float(rows[0]["time_s"]) > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_completed"] == 1 and summary["best_epoch"] == 1
    assert summary["final_metrics"]["val_dice_mean"] == float(rows[0]["val_dice_mean"])
    assert summary["wall_time_s"] > 0 and "val_dice_mean" in summary["initial_metrics"]
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["train"]) == 6 and len(split["validation"]) == 2
    assert str(tmp_path / "cache") in (run_dir / "config.yaml").read_text()  # absolute paths

    # A second fit of the same config never touches the first run.
    before = (run_dir / "checkpoints/last.keras").read_bytes()
    assert run("fit", path).exit_code == 0
    assert len(run_dirs(tmp_path)) == 2
    assert (run_dir / "checkpoints/last.keras").read_bytes() == before

    # Resume: epochs, optimizer step counter and history continue.
    result = run("fit", path, "--resume", run_dir, "--set", "train.epochs=2")
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in history(run_dir)] == ["1", "2"]
    assert json.loads((run_dir / "summary.json").read_text())["epochs_completed"] == 2
    model = keras.saving.load_model(run_dir / "checkpoints/last.keras")
    assert int(model.optimizer.iterations.numpy()) == 4  # 2 epochs x 2 steps

    # Only train.epochs may change on resume.
    result = run("fit", path, "--resume", run_dir, "--set", "train.epochs=3",
                 "--set", "train.learning_rate=0.1")
    assert result.exit_code == 2
    assert "--resume can only change train.epochs, not train.learning_rate" in result.output
    result = run("fit", path, "--resume", run_dir)
    assert result.exit_code == 2 and "already completed 2 of 2 epochs" in result.output


def test_nan_loss_stops_the_cli_with_exit_1_and_a_message(tmp_path, tiny_config):
    path = tiny_config(train={"epochs": 3, "optimizer": "sgd", "learning_rate": 1e30})
    result = run("fit", path)
    assert result.exit_code == 1
    assert "the loss became NaN in epoch 1; training stopped" in result.output
    assert "no epoch had finished, so no checkpoint was saved" in result.output
    assert "start a new run with a lower one" in result.output
    assert "train.learning_rate=1e+29" in result.output and "last.keras" not in result.output
    (run_dir,) = run_dirs(tmp_path)
    assert not (run_dir / "checkpoints/last.keras").exists()  # nothing bad was saved


def test_recorder_keeps_the_last_good_checkpoint_when_the_loss_turns_nan_and_says_so(tmp_path):
    import numpy as np

    from lmstrain.training.callbacks import RunRecorder
    from lmstrain.training.rundir import RunFiles, create_run_dir

    files = RunFiles(create_run_dir(tmp_path, "nan"))
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x = np.ones((4, 3), "float32")

    def batches():  # epoch 1 is finite, epoch 2 feeds NaN targets
        for epoch in range(2):
            for _ in range(2):
                yield x, np.full((4, 1), np.nan if epoch else 1.0, "float32")

    recorder = RunRecorder(files, {})
    model.fit(batches(), epochs=2, steps_per_epoch=2, shuffle=False, callbacks=[recorder],
              verbose=0)
    assert recorder.nan_epoch == 2
    assert json.loads((files.checkpoints / "state.json").read_text())["epoch"] == 1
    saved = keras.saving.load_model(files.checkpoints / "last.keras")
    assert all(np.isfinite(w).all() for w in saved.get_weights())
    assert [r["epoch"] for r in history(files.run_dir)] == ["1"]
    message = str(recorder.nan_error(learning_rate=0.01))
    assert "the loss became NaN in epoch 2" in message
    assert f"{files.checkpoints / 'last.keras'} (epoch 1)" in message
    assert "start a new run" in message and "train.learning_rate=0.001" in message
    assert "resume" not in message.replace("--resume cannot", "")


def test_killed_run_resumes_losing_at_most_one_epoch(tmp_path, tiny_config):
    path = tiny_config(train={"epochs": 100})
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    child = subprocess.Popen([sys.executable, "-m", "lmstrain.cli", "fit", str(path)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = None
    deadline = time.time() + 240
    while time.time() < deadline:
        found = list((tmp_path / "runs").glob("*/checkpoints/state.json"))
        if found and json.loads(found[0].read_text())["epoch"] >= 2:
            state_file = found[0]
            break
        time.sleep(0.2)
    assert state_file, "the run did not finish two epochs in time"
    finished = json.loads(state_file.read_text())["epoch"]
    child.send_signal(signal.SIGKILL)
    child.wait()
    run_dir = state_file.parent.parent
    kept = json.loads(state_file.read_text())["epoch"]
    assert kept >= finished  # nothing that was finished is lost
    result = run("fit", path, "--resume", run_dir, "--set", f"train.epochs={kept + 1}")
    assert result.exit_code == 0, result.output
    epochs = [int(r["epoch"]) for r in history(run_dir)]
    assert epochs == list(range(1, kept + 2))


def test_fit_with_swapping_trains_to_the_same_losses_and_writes_the_plan(tmp_path, tiny_config):
    # One run without and one with lms.enabled, same seed: the swap rewrite must not change
    # a single number, and the plan must list the swapped tensors.
    plain = tiny_config(train={"epochs": 1}, model={"dropout": 0.0}, data={"flip": False})
    assert run("fit", plain).exit_code == 0
    result = run("fit", plain, "--set", "lms.enabled=true", "--set", "lms.verify=true")
    assert result.exit_code == 0, result.output
    without, with_lms = run_dirs(tmp_path)
    def numbers(run_dir):  # every logged number but the epoch's wall time
        return [{k: v for k, v in row.items() if k != "time_s"} for row in history(run_dir)]

    assert numbers(with_lms) == numbers(without)
    plan = json.loads((with_lms / "lms_plan.json").read_text())
    assert plan["active"] and plan["replicas"][0]["host_device"].endswith("CPU:1")
    swapped = plan["functions"][-1]["swapped"]
    assert len(swapped) >= 10
    assert all(s["bytes"] > 0 and s["swap_ins"][0]["trigger"] for s in swapped)
    assert any(check["found"] and check["ok"] for check in plan["checks"])
    summary = json.loads((with_lms / "summary.json").read_text())
    assert summary["lms"]["active"] and summary["lms"]["swapped_bytes_per_step"] > 0
