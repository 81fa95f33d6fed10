"""The local launcher (``lmstrain fit CONFIG --workers N``): N worker processes of a
multi_worker run on this machine, each given ``TF_CONFIG`` with free localhost ports.

Their output is prefixed with ``[worker I]``; the launcher returns the chief's (worker 0's)
exit status. When a worker fails, the others are stopped (SIGTERM, then SIGKILL), and the
status is the chief's own if it had already failed, else 1. Workers die with the launcher,
however it ends (Linux parent-death signal), so none is left behind.
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import yaml

from lmstrain.config import config_from_dict
from lmstrain.errors import UserError
from lmstrain.training.rundir import check_output_root

log = logging.getLogger("lmstrain.training.launcher")

PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_GRACE_S = 10  # after SIGTERM, before SIGKILL
POLL_S = 0.2


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on localhost now (the kernel's choice)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]


def tf_config(ports: list[int], index: int) -> str:
    """``TF_CONFIG`` of worker ``index`` of a cluster on ``ports`` of localhost."""
    return json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def worker_args(flags: dict, config, config_path: str, overrides, resume_dir,
                measure_memory: bool) -> list[str]:
    """Each worker's ``lmstrain`` arguments: the same ``fit`` without ``--workers``, with
    ``train.distribute: multi_worker`` (checked here, before any worker starts)."""
    args = ["-v"] if flags.get("verbose") else ["-q"] if flags.get("quiet") else []
    args += ["fit", config_path]
    for override in overrides:
        args += ["--set", override]
    if resume_dir:
        check_resumable(resume_dir)
        args += ["--resume", resume_dir]
    else:
        config_from_dict(config.to_dict(), ["train.distribute=multi_worker"])
        check_output_root(config.output.root)
        args += ["--set", "train.distribute=multi_worker"]
    return args + (["--measure-memory"] if measure_memory else [])


def check_resumable(run_dir) -> None:
    """``--workers`` with ``--resume``: the run must have been trained with multi_worker."""
    try:
        saved = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    except OSError:
        return  # the workers report what is missing
    distribute = (saved or {}).get("train", {}).get("distribute")
    if distribute != "multi_worker":
        raise UserError(f"--workers: {run_dir} was trained with train.distribute: {distribute}, "
                        "not multi_worker; resume it without --workers")


def launch(args: list[str], workers: int) -> int:
    """Run ``lmstrain ARGS`` as ``workers`` local workers; return the chief's exit status."""
    ports = free_ports(workers)
    log.info("Starting %d workers on localhost ports %s", workers, ", ".join(map(str, ports)))
    processes, copiers = [], []
    try:
        for index in range(workers):
            process = subprocess.Popen(
                [sys.executable, "-m", "lmstrain.cli", *args],
                env={**os.environ, "TF_CONFIG": tf_config(ports, index)},
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                preexec_fn=exit_with_parent)
            processes.append(process)
            copier = threading.Thread(target=_copy, args=(process.stdout, f"[worker {index}] "),
                                      daemon=True)
            copier.start()
            copiers.append(copier)
        return _wait(processes)
    finally:
        _stop(processes)
        for copier in copiers:
            copier.join(timeout=5)


def _wait(processes):
    """Wait for every worker; at the first failure stop the others."""
    while True:
        codes = [p.poll() for p in processes]
        failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            chief = codes[0]
            for i in failed:
                log.error("worker %d exited with status %d%s", i, _status(codes[i]),
                          "; stopping the other workers" if None in codes else "")
            _stop(processes)
            return _status(chief) if chief not in (None, 0) else 1
        if all(code == 0 for code in codes):
            return 0
        time.sleep(POLL_S)


def _status(code):
    """A process's exit status as a shell reports it (128 + signal when killed)."""
    return 128 - code if code < 0 else code


def _stop(processes):
    """SIGTERM every running worker, then SIGKILL what is left after STOP_GRACE_S."""
    running = [p for p in processes if p.poll() is None]
    for p in running:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in running:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _copy(stream, prefix):
    """Copy a worker's output to this process's stdout, each line prefixed."""
    for line in iter(stream.readline, b""):
        sys.stdout.write(prefix + line.decode(errors="replace"))
        sys.stdout.flush()
    stream.close()


def exit_with_parent():
    """A ``preexec_fn`` for a child process, run before it starts: the kernel kills it when
    the process that started it dies (Linux parent-death signal)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
