"""maxres and plan under abuse (issue 11): a killed sweep takes its trial with it, one sweep per
folder, no reuse of trials made with another config, no size outside the requested range, sizes
beyond the simulator end in one line; the benchmarks name configs relative to the project and
the CPU by its model."""

import fcntl
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from lmstrain import report
from lmstrain.cli import main
from lmstrain.planning.sweep import scaled_shapes

ROOT = Path(__file__).resolve().parent.parent
TINY = "model: {base_filters: 4, depth: 3}\ndata: {shape: [16, 16, 16]}\n"  # divisor 4


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def one_line_error(result, code=2):
    """The command ended with ``code`` and a single ``Error:`` line, no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and result.exception.__class__ is SystemExit
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def alive(pid):
    """True while ``pid`` runs (a zombie waiting for its new parent to reap it is dead)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


# --- item 2: a trial dies with its sweep; one sweep per folder; leftovers cleaned -------------

def test_a_killed_sweep_takes_its_running_trial_with_it_and_resume_cleans_up(tiny, tmp_path):
    out, held = tmp_path / "sweep", tmp_path / "held.pid"
    args = [sys.executable, "-m", "lmstrain.cli", "maxres", str(tiny), "--device-memory",
            "256MiB", "--sizes", "16", "--lms", "off", "--executor", "cpu", "--out", str(out)]
    # The trial child stops at the named point "trial-started", says so, and waits there.
    env = {**os.environ, "LMSTRAIN_HOLD_AT": "trial-started", "LMSTRAIN_HOLD_PIDFILE": str(held)}
    sweep = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    trial = None
    try:
        deadline = time.monotonic() + 240
        while not held.exists() and sweep.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert held.exists(), sweep.stderr.read().decode()[-2000:] if sweep.poll() else "no trial"
        trial = int(held.read_text())
        assert alive(trial)
        sweep.send_signal(signal.SIGKILL)  # kill -9 of the sweep while its trial runs
        assert sweep.wait(60) == -signal.SIGKILL
        deadline = time.monotonic() + 30
        while alive(trial) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(trial), "the trial outlived its sweep"
    finally:
        sweep.kill()
        if trial and alive(trial):
            os.kill(trial, signal.SIGKILL)
    assert (out / ".trial" / "request.json").exists()  # the killed trial's request
    (out / "trials" / ".mem1-b1-nolms-16x16x16.json.x1.json").write_text("{")  # and what a
    (out / ".results.json.x2.json").write_text("{")  # kill during an atomic write leaves
    resumed = subprocess.run([*args, "--resume", "--json"], capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout)["summary"][0]["max_size"] == 16
    hidden = [p.relative_to(out) for p in out.rglob(".*") if p.name != ".lock"]
    assert hidden == []  # leftovers removed


def test_a_second_sweep_on_the_same_folder_exits_2_naming_the_first(tiny, tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    with open(out / ".lock", "w") as lock:  # a running sweep holds this lock, its pid inside
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("4242\n")
        lock.flush()
        result = CliRunner().invoke(main, ["maxres", str(tiny), "--device-memory", "256MiB",
                                           "--sizes", "16", "--mode", "simulate", "--executor",
                                           "cpu", "--out", str(out)])
    line = one_line_error(result)
    assert str(out) in line and "pid 4242" in line
    assert not (out / "trials").exists() or not any((out / "trials").iterdir())


# --- item 3: --resume refuses trials made with another config or options --------------------

def test_resume_with_another_config_is_refused_naming_what_changed(tiny, tmp_path):
    args = ["maxres", str(tiny), "--mode", "simulate", "--device-memory", "48MiB", "--sizes",
            "16:48:8", "--lms", "off", "--executor", "cpu", "--out", str(tmp_path / "o"),
            "--json"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    line = one_line_error(CliRunner().invoke(main, [*args, "--resume", "--set",
                                                    "model.base_filters=2"]))
    assert "model.base_filters" in line and "4" in line and "2" in line
    line = one_line_error(CliRunner().invoke(main, [*args, "--resume", "--host-memory", "1GiB"]))
    assert "--host-memory" in line
    again = CliRunner().invoke(main, [*args, "--resume"])  # the same sweep resumes
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["summary"] == json.loads(first.output)["summary"]


# --- item 6: no size outside the requested range --------------------------------------------

def test_sizes_that_round_outside_the_range_are_left_out():
    assert scaled_shapes((16, 16, 16), range(6, 14), 4) == [(8, (8, 8, 8)), (12, (12, 12, 12))]
    assert scaled_shapes((64, 64, 32), [20, 24], 16) == []


def test_a_range_without_a_valid_size_exits_2(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: {depth: 4}\n")  # divisor 8
    result = CliRunner().invoke(main, ["maxres", str(config), "--sizes", "4:6:1",
                                       "--device-memory", "1GiB", "--out", str(tmp_path / "o")])
    line = one_line_error(result)
    assert "4:6" in line and "8" in line
    assert not (tmp_path / "o").exists()


# --- item 7: sizes beyond what can be planned: one line, exit 2 -----------------------------

@pytest.mark.parametrize("args, named", [
    (["plan", "--size", "20000"], "20000"),
    (["maxres", "--sizes", "1:100000:1", "--device-memory", "1GiB", "--mode", "simulate"],
     "100000"),
])
def test_sizes_beyond_planning_exit_2_with_one_line(tiny, tmp_path, args, named):
    command, *rest = args
    result = CliRunner().invoke(main, [command, str(tiny), *rest, "--executor", "cpu",
                                       *(["--out", str(tmp_path / "o")] if command == "maxres"
                                         else [])])
    assert named in one_line_error(result)


def test_a_step_beyond_the_simulator_exits_2_naming_the_size(tiny):
    result = CliRunner().invoke(main, ["plan", str(tiny), "--size", "2048", "--batch", "4096",
                                       "--executor", "cpu"])
    line = one_line_error(result)
    assert "2048x2048x2048" in line and "4096" in line


# --- item 11: benchmark results name configs relative to the project, the CPU by model -------

def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmarks_name_configs_relative_to_the_project_and_the_cpu_model():
    overhead = load_script("bench_overhead")
    assert overhead.project_path(ROOT / "configs" / "demo.yaml") == "configs/demo.yaml"
    assert overhead.project_path("/elsewhere/c.yaml") == "/elsewhere/c.yaml"
    pipeline = load_script("bench_pipeline")
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
             .splitlines() if line.startswith("model name")]
    assert pipeline.cpu_model() == (names[0] if names else f"{pipeline.platform.machine()} CPU")


def test_the_maxres_plot_draws_bars_when_one_budget_was_swept(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.append(fig))
    rows = [{"device_memory_bytes": 2**28, "batch": 1, "lms": swap, "max_voxels": voxels}
            for swap, voxels in ((False, 56**3), (True, 96**3))]
    report.plot_maxres(rows, tmp_path / "max_voxels.png")
    (ax,) = figures[0].axes
    assert [round(bar.get_height()) for bar in ax.patches] == [56**3, 96**3]
    report.plot_maxres(rows + [{**r, "device_memory_bytes": 2**29} for r in rows],
                       tmp_path / "max_voxels.png")
    assert not figures[1].axes[0].patches and len(figures[1].axes[0].lines) == 2


def test_the_benchmark_report_says_why_each_study_size_swapped_or_not():
    text = "\n".join(load_script("bench_report").study_section())
    study = json.loads((ROOT / "bench" / "results" / "study" / "study.json").read_text())
    for size in study["sizes"]:
        assert f"{size['size']}: {size['decision']['why']}" in text
