"""Training runs that are killed while saving, run twice at once, diverge or run out of disk:
exact resume, and one-line errors that name the path."""

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest
from click.testing import CliRunner

from lmstrain.cli import main

HOLD_LOCK = """\
import sys
from lmstrain.training.rundir import RunFiles
with RunFiles(sys.argv[1]).lock():
    print("locked", flush=True)
    sys.stdin.read()
"""


def run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def fit_killed_at(point, *args):
    """``lmstrain fit ARGS`` in a subprocess that exits at the named fault point."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "LMSTRAIN_KILL_AT": point}
    return subprocess.run([sys.executable, "-m", "lmstrain.cli", "fit", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=300)


def only_run_dir(tmp_path):
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir


def hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(result, *words):
    assert isinstance(result.exception, SystemExit), result.output  # not an uncaught error
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for word in words:
        assert str(word) in errors[0], errors[0]


@pytest.mark.parametrize("point, committed", [
    ("epoch-files-written", 1),
    pytest.param("epoch-committed", 2, marks=pytest.mark.slow),
])
def test_kill_while_saving_an_epoch_resumes_with_the_exact_step_count(tmp_path, tiny_config,
                                                                     point, committed):
    # Epoch 2 is killed after its checkpoint and history are written but before state.json
    # names them (it must be trained again from epoch 1's weights), or right after state.json,
    # before last.keras points at it (it counts).
    path = tiny_config()  # 1 epoch of 2 steps
    assert run("fit", path).exit_code == 0
    run_dir = only_run_dir(tmp_path)
    killed = fit_killed_at(point, path, "--resume", run_dir, "--set", "train.epochs=2")
    assert killed.returncode == 137, killed.stderr
    epochs = committed + 1
    result = run("fit", path, "--resume", run_dir, "--set", f"train.epochs={epochs}")
    assert result.exit_code == 0, result.output
    assert f"after epoch {committed} of {epochs}" in result.output
    model = keras.saving.load_model(run_dir / "checkpoints/last.keras")
    assert int(model.optimizer.iterations.numpy()) == epochs * 2  # epochs x steps, exactly
    state = json.loads((run_dir / "checkpoints/state.json").read_text())
    assert state["epoch"] == epochs
    # Only the committed epoch's files are left (an uncommitted epoch's are cleaned up).
    named = {state["checkpoint"], state["best_checkpoint"]}
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {
        "state.json", "last.keras", "best.keras", *named}


def test_resume_of_a_run_in_use_is_refused_naming_the_process(tmp_path, tiny_config):
    path = tiny_config()
    assert run("fit", path).exit_code == 0
    run_dir = only_run_dir(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = hashes(run_dir)
        result = run("fit", path, "--resume", run_dir, "--set", "train.epochs=2")
        assert result.exit_code == 2, result.output
        assert_one_line_error(result, run_dir, f"pid {holder.pid}")
        assert hashes(run_dir) == before
    finally:
        holder.stdin.close()
        holder.wait()


def test_output_root_that_is_a_file_is_refused_before_any_work(tmp_path, tiny_config):
    path = tiny_config()
    (tmp_path / "runs").write_text("not a folder")
    result = run("fit", path)
    assert result.exit_code == 2, result.output
    assert_one_line_error(result, "output.root", tmp_path / "runs", "is a file")
    assert (tmp_path / "runs").read_text() == "not a folder"
    assert not (tmp_path / "cache").exists()  # refused before preprocessing


def test_read_only_output_root_is_refused_before_any_work(tmp_path, tiny_config, monkeypatch):
    # Tests run as root, whom chmod does not stop: the folder reports itself read-only.
    path = tiny_config()
    real_access = os.access

    def access(target, mode, **kwargs):
        if mode & os.W_OK and Path(target) == tmp_path:
            return False
        return real_access(target, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    result = run("fit", path)
    assert result.exit_code == 2, result.output
    assert_one_line_error(result, "output.root", tmp_path, "read-only")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


@pytest.fixture
def full_disk(monkeypatch):
    """Every atomic write under the returned folder fails with ENOSPC (a full output disk)."""
    import lmstrain.atomic
    import lmstrain.training.rundir

    real_atomic_path = lmstrain.atomic.atomic_path
    disk = {}

    def atomic_path(path):
        if disk["root"] in Path(path).parents and Path(path).name.endswith(disk["suffix"]):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_atomic_path(path)

    monkeypatch.setattr(lmstrain.atomic, "atomic_path", atomic_path)
    monkeypatch.setattr(lmstrain.training.rundir, "atomic_path", atomic_path)
    return disk


@pytest.mark.parametrize("suffix, exit_code, failing", [
    ("config.yaml", 1, "config.yaml"),  # the first file of a new run directory
    (".keras", 1, "checkpoints/epoch-0001.keras"),  # the first checkpoint, during training
])
def test_full_disk_gives_one_line_naming_the_file(tmp_path, tiny_config, full_disk, suffix,
                                                  exit_code, failing):
    path = tiny_config()
    full_disk.update(root=tmp_path / "runs", suffix=suffix)
    result = run("fit", path)
    assert result.exit_code == exit_code, result.output
    run_dir = only_run_dir(tmp_path)
    assert_one_line_error(result, run_dir / failing, "No space left on device")
