"""Multi-worker training (``train.distribute: multi_worker``) with real worker processes.

Every run here is a real ``lmstrain fit`` subprocess: ``--workers 2`` (the local launcher) or
two workers started by the test with their own ``TF_CONFIG``, as on a cluster. Each worker
computes on /CPU:0 and swaps to /CPU:1. Dropout 0, flips off and instance normalisation, so
that two workers at batch 1 compute what one process with two mirrored replicas computes.
"""

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from lmstrain.cli import main
from lmstrain.config import config_from_dict
from lmstrain.data.brats import discover_cases
from lmstrain.data.split import split_cases
from lmstrain.errors import ConfigError, UserError
from lmstrain.training import cluster
from lmstrain.training.fit import volume_cache, worker_training_data
from lmstrain.training.launcher import free_ports, tf_config

TIMEOUT = 10  # train.worker_timeout of the lost-worker test


@pytest.fixture(scope="module")
def setup(tmp_path_factory, brats2021_root):
    """A config of 2 epochs on the 6 training cases (3 steps at a global batch of 2)."""
    tmp = tmp_path_factory.mktemp("multiworker")
    raw = {
        "data": {"root": str(brats2021_root), "shape": [16, 16, 16], "flip": False,
                 "cache_dir": str(tmp / "cache")},
        "model": {"base_filters": 4, "depth": 3, "dropout": 0.0, "norm": "instance"},
        "train": {"epochs": 2, "batch_size": 1, "learning_rate": 1e-3},
        "lms": {"enabled": True, "verify": True},
        "output": {"root": str(tmp / "runs")},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return tmp, path


def lmstrain(*args, env=None, timeout=300):
    """``lmstrain ARGS`` in a subprocess; (result, wall seconds)."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "lmstrain.cli", *map(str, args)],
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
                            capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - started


def history(run_dir):
    with (run_dir / "history.csv").open() as handle:
        return list(csv.DictReader(handle))


def losses(run_dir):
    return [[float(row[k]) for k in ("loss", "val_loss")] for row in history(run_dir)]


def left_behind(marker):
    """Processes whose command line mentions ``marker`` (a test's own folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(marker) in (proc / "cmdline").read_text():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def runs(setup):
    """``--workers 2`` and one process with two mirrored replicas, same global batch."""
    tmp, path = setup
    workers, workers_s = lmstrain("fit", path, "--workers", 2, "--set", "output.name=workers")
    assert workers.returncode == 0, workers.stdout + workers.stderr
    mirrored, mirrored_s = lmstrain("fit", path, "--set", "output.name=mirrored",
                                    "--set", "train.distribute=mirrored")
    assert mirrored.returncode == 0, mirrored.stdout + mirrored.stderr
    print(f"\nwall time: --workers 2 {workers_s:.1f} s, one process mirrored {mirrored_s:.1f} s")
    return {"workers": next((tmp / "runs").glob("workers-*")), "output": workers.stdout,
            "mirrored": next((tmp / "runs").glob("mirrored-*"))}


def test_two_workers_train_to_the_losses_of_one_mirrored_process(runs):
    np.testing.assert_allclose(losses(runs["workers"]), losses(runs["mirrored"]), rtol=1e-5)
    assert [row["epoch"] for row in history(runs["workers"])] == ["1", "2"]
    summary = json.loads((runs["workers"] / "summary.json").read_text())
    assert summary["distribute"] == {"strategy": "multi_worker", "workers": 2, "replicas": 2,
                                     "devices": ["/CPU:0"], "batch_size_per_replica": 1,
                                     "global_batch_size": 2}
    # Both workers ran 3 steps per epoch, reported the same validation dice, and swapped
    # each on its own /CPU:0 -> /CPU:1 with every swap node live.
    out = runs["output"].splitlines()
    for worker in (0, 1):
        mine = [line for line in out if line.startswith(f"[worker {worker}] ")]
        assert any("2 replicas in all, batch 1 per replica, 2 per step, 3 steps per epoch" in line
                   for line in mine)
        assert any("swap nodes live after Grappler" in line for line in mine)
    dice = {w: [line.split("val_dice_mean ")[1][:6] for line in out
                if line.startswith(f"[worker {w}] epoch ")] for w in (0, 1)}
    assert dice[0] == dice[1] and len(dice[0]) == 2
    plan = json.loads((runs["workers"] / "lms_plan.json").read_text())
    assert [r["host_device"][-5:] for r in plan["replicas"]] == ["CPU:1"]


def test_only_the_chief_writes_the_run_directory(runs, setup):
    tmp, _ = setup
    run_dir = runs["workers"]
    assert sorted(p.name for p in (tmp / "runs").iterdir()) == sorted(
        [run_dir.name, runs["mirrored"].name])  # worker 1 made no run directory
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "split.json", "history.csv", "summary.json", "progress.png",
            "tensorboard", "checkpoints", "lms_plan.json"} <= names
    checkpoints = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert {"state.json", "last.keras", "best.keras"} <= checkpoints
    assert len(list((run_dir / "tensorboard").rglob("*tfevents*"))) == 2  # train, validation
    model = keras.saving.load_model(run_dir / "checkpoints/last.keras")
    assert int(model.optimizer.iterations.numpy()) == 2 * 3
    assert (run_dir / ".lock").read_text().strip() != ""  # held by the chief alone


def test_each_worker_reads_its_own_whole_batches_of_each_pass(brats2021_root, tmp_path):
    # 6 training cases, global batch 4 (2 workers x 1 replica x batch 2): one step per epoch;
    # each pass leaves out a different 2 cases, and no worker reads a case the other reads.
    config = config_from_dict({
        "data": {"root": str(brats2021_root), "shape": [16, 16, 16], "flip": False,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"distribute": "multi_worker", "batch_size": 2}})
    cases = discover_cases(brats2021_root)
    train_cases, _ = split_cases(cases, config.data.val_fraction, config.train.seed)
    cache = volume_cache(config)
    ids = {cache.load(c)[0].tobytes(): c.case_id for c in train_cases}
    epochs = 3
    seen = {}
    for worker in (0, 1):
        data = worker_training_data(config, train_cases, steps=1, epochs_completed=0,
                                    worker=worker, workers=2, local_replicas=1)
        batches = [images.numpy() for images, _ in data.take(epochs)]
        assert all(len(b) == 2 for b in batches)  # one step of batch 2 per epoch
        seen[worker] = [[ids[image.tobytes()] for image in b] for b in batches]
    for epoch in range(epochs):
        assert not set(seen[0][epoch]) & set(seen[1][epoch])
    passes = [seen[0][e] + seen[1][e] for e in range(epochs)]
    assert len({frozenset(p) for p in passes}) > 1  # a different remainder each pass
    # Resumed after epoch 1, worker 0 reads what it would have read in epoch 2.
    resumed = worker_training_data(config, train_cases, steps=1, epochs_completed=1,
                                   worker=0, workers=2, local_replicas=1)
    images, _ = next(iter(resumed))
    assert [ids[image.tobytes()] for image in images.numpy()] == seen[0][1]


def two_workers(path, tmp_path, ports):
    """Start worker 0 of a two-worker cluster on ``ports`` (output piped, no swapping,
    ``train.worker_timeout`` = TIMEOUT); return it, the command line and worker 1's
    environment, for the caller to start worker 1 with its own fault point."""
    args = [sys.executable, "-m", "lmstrain.cli", "fit", str(path),
            "--set", "train.distribute=multi_worker", "--set", f"train.worker_timeout={TIMEOUT}",
            "--set", f"output.root={tmp_path / 'runs'}", "--set", "lms.enabled=false"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    chief = subprocess.Popen(args, env={**env, "TF_CONFIG": tf_config(ports, 0)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return chief, args, {**env, "TF_CONFIG": tf_config(ports, 1)}


@pytest.mark.slow  # about 20 s; naming the lost worker is tested on TensorFlow's message below
def test_a_lost_worker_stops_the_other_within_the_timeout_naming_it(setup, tmp_path):
    _, path = setup
    ports = free_ports(2)
    chief, args, env_1 = two_workers(path, tmp_path, ports)
    # Worker 1 dies after its first training step (of 3 in epoch 1), as after kill -9.
    other = subprocess.run(args, env=env_1 | {"LMSTRAIN_KILL_AT": "training-step"},
                           capture_output=True, text=True, timeout=300)
    died = time.monotonic()
    assert other.returncode == 137, other.stderr
    out, err = chief.communicate(timeout=TIMEOUT + 30)
    waited = time.monotonic() - died
    assert chief.returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith(f"Error: lost worker 1 (localhost:{ports[1]})")
    assert "--resume" in errors[0]
    assert waited < TIMEOUT, waited
    assert left_behind(tmp_path) == []
    state = next((tmp_path / "runs").iterdir()) / "checkpoints/state.json"
    assert not state.exists()  # no epoch had finished


@pytest.mark.slow
def test_a_frozen_worker_stops_the_other_when_its_heartbeat_is_overdue(setup, tmp_path):
    # Worker 1 stops dead (SIGSTOP) after its first step: its connections stay open and only
    # the missing heartbeat tells, as when a machine vanishes from the network.
    _, path = setup
    ports = free_ports(2)
    chief, args, env_1 = two_workers(path, tmp_path, ports)
    frozen = subprocess.Popen(args, env=env_1 | {"LMSTRAIN_FREEZE_AT": "training-step"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        stat = Path(f"/proc/{frozen.pid}/stat")
        deadline = time.monotonic() + 300
        while stat.read_text().split(") ")[1][0] != "T" and time.monotonic() < deadline:
            time.sleep(0.1)
        stopped = time.monotonic()
        _, err = chief.communicate(timeout=TIMEOUT + 60)
        waited = time.monotonic() - stopped
    finally:
        frozen.kill()
        frozen.wait()
    assert chief.returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: lost worker 1 (localhost:{ports[1]}): no heartbeat for "
                      f"train.worker_timeout = {TIMEOUT} s; worker 0 stopped training. Continue "
                      "from the last finished epoch with `lmstrain fit CONFIG --resume RUN_DIR` "
                      "on every worker"]
    assert waited < TIMEOUT + 5, waited  # the last heartbeat came before the freeze
    assert left_behind(tmp_path) == []


@pytest.mark.slow
def test_a_group_killed_after_epoch_1_resumes_on_both_workers(setup, tmp_path):
    _, path = setup
    common = ["--set", f"output.root={tmp_path / 'runs'}", "--set", "lms.enabled=false"]
    # The chief exits as after kill -9 right after committing epoch 1; the launcher stops
    # worker 1 at once, so the whole group is gone.
    killed, _ = lmstrain("fit", path, "--workers", 2, *common,
                         env={"LMSTRAIN_KILL_AT": "epoch-committed"})
    assert killed.returncode == 137, killed.stdout
    assert "worker 0 exited with status 137" in killed.stderr
    assert left_behind(tmp_path) == []
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "checkpoints/state.json").read_text())["epoch"] == 1
    resumed, _ = lmstrain("fit", path, "--workers", 2, "--resume", run_dir)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for worker in (0, 1):
        assert f"[worker {worker}] Resuming {run_dir} after epoch 1 of 2" in resumed.stdout
    assert [row["epoch"] for row in history(run_dir)] == ["1", "2"]
    model = keras.saving.load_model(run_dir / "checkpoints/last.keras")
    assert int(model.optimizer.iterations.numpy()) == 2 * 3
    assert left_behind(tmp_path) == []


def test_multi_worker_without_a_cluster_is_refused_before_a_run_directory(
        tmp_path, tiny_config, monkeypatch):
    for name in ("TF_CONFIG", cluster.SLURM_TASKS):
        monkeypatch.delenv(name, raising=False)
    path = tiny_config(train={"distribute": "multi_worker"})
    result = CliRunner().invoke(main, ["fit", str(path)])
    assert result.exit_code == 2, result.output
    assert "train.distribute: multi_worker needs a cluster: set TF_CONFIG" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["localhost:1"]}}')
    result = CliRunner().invoke(main, ["fit", str(path)])
    assert result.exit_code == 2 and "TF_CONFIG: expected" in result.output, result.output
    with pytest.raises(ConfigError, match=r"train\.devices: applies only with train\."
                                          r"distribute: mirrored; a multi_worker run"):
        config_from_dict({"train": {"distribute": "multi_worker", "devices": ["/GPU:0"]}})


def test_a_worker_that_cannot_read_the_run_says_it_needs_a_shared_file_system(
        tmp_path, tiny_config, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", tf_config([1, 2], 1))
    result = CliRunner().invoke(main, ["fit", str(tiny_config()), "--resume",
                                       str(tmp_path / "elsewhere")])
    assert result.exit_code == 2, result.output
    assert "must be on a file system all workers share" in result.output
    assert "Traceback" not in result.output


def test_workers_refuse_to_resume_a_run_not_trained_with_multi_worker(tmp_path, tiny_config):
    path = tiny_config()
    run_dir = tmp_path / "runs" / "old"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"distribute": "none"}}))
    result = CliRunner().invoke(main, ["fit", str(path), "--workers", "2", "--resume",
                                       str(run_dir)])
    assert result.exit_code == 2, result.output
    assert "was trained with train.distribute: none, not multi_worker" in result.output


def port_in_use(port):
    with socket.socket() as s:
        return s.connect_ex(("localhost", port)) == 0


@pytest.mark.slow
def test_two_workers_train_with_the_cluster_from_slurms_environment(setup, tmp_path):
    # Slurm's variables as srun sets them for 2 tasks on one node (set here by the test, not
    # by a real Slurm; its ports are fixed: 8888 and 8889).
    if port_in_use(cluster.SLURM_PORT_BASE) or port_in_use(cluster.SLURM_PORT_BASE + 1):
        pytest.skip("ports 8888/8889 are in use")
    _, path = setup
    env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", SLURM_STEP_NUM_TASKS="2",
               SLURM_STEP_NODELIST="localhost", SLURM_STEP_TASKS_PER_NODE="2")
    args = [sys.executable, "-m", "lmstrain.cli", "fit", str(path), "--set", "train.epochs=1",
            "--set", "train.distribute=multi_worker", "--set", "lms.enabled=false",
            "--set", f"output.root={tmp_path / 'runs'}"]
    tasks = [subprocess.Popen(args, env={**env, "SLURM_PROCID": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [task.communicate(timeout=300) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs
    assert "Worker 1 of 2 (/job:worker/replica:0/task:1, cluster from Slurm)" in outputs[1][1]
    assert "Worker 1 of 2: trained in step with the chief" in outputs[1][0]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert [row["epoch"] for row in history(run_dir)] == ["1"]


def test_the_cluster_comes_from_slurm_under_srun(monkeypatch):
    # As srun sets them for task 1 of 2 on one node (not run on a real Slurm cluster).
    monkeypatch.delenv("TF_CONFIG", raising=False)
    for name, value in {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1",
                        "SLURM_STEP_NODELIST": "node[07-08]",
                        "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}.items():
        monkeypatch.setenv(name, value)
    resolver = cluster.cluster_resolver()
    assert resolver.cluster_spec().as_dict() == {"worker": ["node07:8888", "node08:8888"]}
    worker = cluster.this_worker(resolver)
    assert (worker.index, worker.workers, worker.task, worker.source, worker.is_chief) == (
        1, 2, "/job:worker/replica:0/task:1", "Slurm", False)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ or os.environ["CUDA_VISIBLE_DEVICES"]
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "localhost")
    assert cluster.cluster_resolver().cluster_spec().as_dict() == {
        "worker": ["localhost:8888", "localhost:8889"]}
    monkeypatch.delenv("SLURM_STEP_TASKS_PER_NODE")
    with pytest.raises(UserError, match="cannot read the Slurm job step's tasks"):
        cluster.cluster_resolver()


def test_a_lost_worker_is_named_from_tensorflows_message(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({
        "cluster": {"chief": ["a:1"], "worker": ["b:2", "c:3"]},
        "task": {"type": "worker", "index": 0}}))
    resolver = cluster.cluster_resolver()
    me = cluster.this_worker(resolver)
    assert (me.index, me.workers, me.is_chief) == (1, 3, False)
    heartbeat = ("Error reported from /job:worker/task:1: The following tasks are unhealthy "
                 "(stopped sending heartbeats):\n/job:worker/replica:0/task:1\n")
    assert cluster.lost_worker_message(heartbeat, me, resolver, 30).startswith(
        "lost worker 2 (c:3): no heartbeat for train.worker_timeout = 30 s; worker 1 stopped")
    broken = "remote target /job:chief/replica:0/task:0 while calling RecvBuf: Socket closed"
    assert cluster.lost_worker_message(broken, me, resolver, 30).startswith(
        "lost worker 0 (a:1): its connection broke")
