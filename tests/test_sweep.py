"""maxres: the search (pure), real trial subprocesses, resume, and the command's errors."""

import json
from dataclasses import asdict

import click
import pytest
from click.testing import CliRunner

from lmstrain.cli import main
from lmstrain.config import config_from_dict
from lmstrain.cli.params import SizeRange
from lmstrain.errors import UserError
from lmstrain.planning import harness
from lmstrain.planning.sweep import (RESULT_SECTIONS, Sweep, SweepOptions, Trial, TrialSpec,
                                     fingerprint, run_trial_process, scaled_shapes,
                                     search_largest)


def fake_runner(limit, log):
    """Trials pass up to ``limit`` (inclusive), like a real device with fixed memory."""
    def run(candidate):
        log.append(candidate)
        return Trial(shape=[candidate] * 3, size=candidate, batch=1, lms=False,
                     device_memory_bytes=1, status="ok" if candidate <= limit else "oom")
    return run


@pytest.mark.parametrize("start", [0, 2, 5, 9])
def test_search_finds_the_limit_from_any_start_and_confirms_it(start):
    sizes = list(range(16, 176, 16))          # 16 .. 160
    log = []
    best, trials = search_largest(sizes, fake_runner(96, log), start)
    assert sizes[best] == 96
    assert 112 in log and all(t.ok == (t.size <= 96) for t in trials)  # one step above failed
    assert len(log) == len(set(log))


def test_search_with_a_good_seed_needs_two_trials():
    log = []
    best, _ = search_largest([16, 32, 48, 64], fake_runner(32, log), start=1)
    assert best == 1 and log == [32, 48]


def test_search_when_nothing_or_everything_fits():
    assert search_largest([16, 32], fake_runner(8, []), 1)[0] is None
    log = []
    best, _ = search_largest([16, 32], fake_runner(999, log), 0)
    assert best == 1 and log == [16, 32]      # nothing above the range to confirm with
    assert search_largest([], fake_runner(1, []), 0) == (None, [])


def test_sizes_keep_the_aspect_and_round_to_the_divisor():
    sizes = SizeRange()
    assert sizes.convert("64:128:32", None, None) == [64, 96, 128]
    assert sizes.convert("80", None, None) == [80]
    assert scaled_shapes((160, 192, 128), [96, 192], 16) == [
        (96, (80, 96, 64)), (192, (160, 192, 128))]
    assert scaled_shapes((64, 64, 32), [32, 40], 16) == [(32, (32, 32, 16))]  # deduplicated
    for bad in ("64:32:16", "0:64:16", "64:128:0", "a:b:c", "1:2:3:4"):
        with pytest.raises(click.BadParameter, match="FROM"):
            sizes.convert(bad, None, None)


@pytest.fixture
def tiny():
    return config_from_dict({"model": {"base_filters": 4, "depth": 3},
                             "data": {"shape": [16, 16, 16]}, "train": {"batch_size": 1}})


def test_real_trials_pass_and_run_out_of_memory_in_the_child(tiny, tmp_path):
    ok = run_trial_process(tiny, TrialSpec((16, 16, 16), 1, False, 256 * 2**20), 600)
    assert ok.status == "ok", ok.reason
    assert 0 < ok.measured_peak_bytes < 256 * 2**20 and ok.step_time_s > 0
    assert ok.source == "cpu-capped"
    oom = run_trial_process(tiny, TrialSpec((64, 64, 64), 1, False, 64 * 2**20), 600,
                            tmp_path / "trial")
    assert oom.status == "oom"
    assert oom.reason.startswith("ResourceExhaustedError: OOM when allocating")
    assert not list(tmp_path.iterdir())  # request and result files cleaned up


def test_a_swapping_trial_on_cpu_is_judged_by_its_device_attributed_peak(tiny, tmp_path):
    trial = run_trial_process(tiny, TrialSpec((16, 16, 16), 1, True, 2**20), 600)
    assert trial.source == "cpu-device-attributed" and trial.extra["swapped_bytes"] > 0
    assert trial.measured_peak_bytes == (trial.extra["resident_bytes"]
                                         + trial.extra["step_peak_allocation_bytes"]) > 2**20
    assert trial.status == "oom" and "exceeds the budget of 1.0 MiB" in trial.reason


def test_resume_reuses_finished_trials(tiny, tmp_path, monkeypatch):
    options = SweepOptions(sizes=[16, 24, 32], batch_sizes=[1], lms=[False],
                           budgets=[2**30])
    sweep = Sweep(tiny, options, tmp_path / "sweep")
    # Trials an interrupted sweep finished, every candidate: wherever the simulator seeds the
    # search, it needs no new trial. The recorded outcome at 32^3 ("oom" at 1 GiB) is not what
    # a real trial would give, so the summary shows they were reused.
    monkeypatch.setattr("lmstrain.planning.sweep.run_trial_process",
                        lambda *args: pytest.fail("a finished trial ran again"))
    recorded = tiny.to_dict()  # recorded before these keys existed: they take their defaults
    for section, key in (("lms", "recompute"), ("train", "distribute"), ("train", "devices")):
        del recorded[section][key]
    (sweep.out_dir / "sweep.json").write_text(json.dumps(
        {"config": recorded, "options": asdict(options)}))
    for size, status in ((16, "ok"), (24, "ok"), (32, "oom")):
        spec = TrialSpec((size,) * 3, 1, False, 2**30)
        trial = Trial(shape=[size] * 3, size=size, batch=1, lms=False,
                      device_memory_bytes=2**30, status=status, source="cpu-capped")
        (sweep.trial_dir / f"{spec.key}.json").write_text(json.dumps(trial.to_dict()))
    with pytest.raises(UserError, match="already holds a sweep; pass --resume"):
        Sweep(tiny, options, tmp_path / "sweep")
    results = Sweep(tiny, options, tmp_path / "sweep", resume=True).run()
    assert results["summary"] == [{
        "device_memory_bytes": 2**30, "batch": 1, "lms": False, "max_size": 24,
        "max_shape": [24, 24, 24], "max_voxels": 24**3, "limited_by": "device memory"}]
    assert {t["size"] for t in results["trials"]} >= {24, 32}
    saved = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert saved["summary"] == results["summary"]
    header = (tmp_path / "sweep" / "results.csv").read_text().splitlines()[0]
    assert header.startswith("shape,size,batch,lms,device_memory_bytes,status,reason")
    assert (tmp_path / "sweep" / "max_voxels.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--sizes", "128:64:16", "--device-memory", "1GiB"],
     "Invalid value for '--sizes': 128:64:16: need 0 < FROM <= TO and STEP > 0"),
    (["--sizes", "big", "--device-memory", "1GiB"],
     "Invalid value for '--sizes': expected FROM:TO:STEP"),
    (["--batch-sizes", "1,0", "--device-memory", "1GiB"],
     "Invalid value for '--batch-sizes': 0 is not in the range x>=1"),
    (["--device-memory", "lots"], "Invalid value for '--device-memory': expected a size such as 16GiB"),
    ([], "pass --device-memory"),
])
def test_bad_ranges_exit_2_with_a_clear_message(tmp_path, args, message):
    config = tmp_path / "c.yaml"
    config.write_text("model: {depth: 3}\n")
    result = CliRunner().invoke(main, ["maxres", str(config), "--out", str(tmp_path / "o"),
                                       *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_a_child_that_dies_is_a_crash_and_a_slow_one_a_timeout(tiny, tmp_path):
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", "import os, signal, sys; "
                            "print('last words', file=sys.stderr); "
                            "os.kill(os.getpid(), signal.SIGSEGV)"],
                           capture_output=True, text=True)
    assert harness.death(child.returncode, child.stderr) == "killed by SIGSEGV: last words"
    slow = run_trial_process(tiny, TrialSpec((16, 16, 16), 1, False, 2**30), 1)
    assert slow.status == "timeout" and slow.reason == "no result within 1 s"


@pytest.mark.slow  # about 80 s; `plan` searches with the simulator in the default run
def test_simulate_mode_finds_both_limits_without_training_and_resumes(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: {base_filters: 4, depth: 3}\ndata: {shape: [16, 16, 16]}\n")
    args = ["maxres", str(config), "--mode", "simulate", "--device-memory", "16MiB",
            "--sizes", "16:96:8", "--batch-sizes", "1", "--out", str(tmp_path / "o"),
            "--executor", "cpu", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    results = json.loads(result.output)
    off, on = results["summary"]
    assert off["max_size"] and on["max_size"] > off["max_size"]  # swapping trains larger
    for row in (off, on):  # each maximum is confirmed by a simulated failure one step above
        above = [t for t in results["trials"] if t["lms"] == row["lms"]
                 and t["size"] == row["max_size"] + 8]
        assert [t["status"] for t in above] == ["oom"] and row["limited_by"]
        trials = [t for t in results["trials"] if t["lms"] == row["lms"]]
        assert all(t["source"].startswith("simulated") for t in trials)
        assert all(t["predicted_peak_bytes"] <= 16 * 2**20 for t in trials if t["status"] == "ok")
    assert [link["link"] for link in on["transfer_model"]["links"]][0] == "PCIe 3.0 x16"
    assert on["transfer_model"]["swapped_bytes_per_step"] > 0
    assert len(list((tmp_path / "o" / "trials").glob("*.json"))) == len(results["trials"])
    again = CliRunner().invoke(main, [*args, "--resume"])
    assert again.exit_code == 0 and json.loads(again.output)["summary"] == results["summary"]


def test_gpu_trials_with_swapping_may_use_the_host_ram_like_fit(monkeypatch):
    from lmstrain.lms.devices import physical_memory

    monkeypatch.delenv("TF_GPU_HOST_MEM_LIMIT_IN_MB", raising=False)
    swap = harness.request({}, (16, 16, 16), 1, swap={}, budget_bytes=2**30)
    plain = harness.request({}, (16, 16, 16), 1, budget_bytes=2**30)
    env = harness.environment(swap, gpu=True)
    assert env["TF_GPU_HOST_MEM_LIMIT_IN_MB"] == str(physical_memory() // 2**20)
    assert "TF_CPU_BFC_MEM_LIMIT_IN_MB" not in env
    assert "TF_GPU_HOST_MEM_LIMIT_IN_MB" not in harness.environment(plain, gpu=True)
    assert harness.environment(plain, gpu=False)["TF_CPU_BFC_MEM_LIMIT_IN_MB"] == "1024"
    monkeypatch.setenv("TF_GPU_HOST_MEM_LIMIT_IN_MB", "4096")  # the user's own setting wins
    assert "TF_GPU_HOST_MEM_LIMIT_IN_MB" not in harness.environment(swap, gpu=True)


def test_the_swap_settings_of_swap_on_trials_are_part_of_a_sweeps_fingerprint():
    """A resumed sweep must match them (bench-peers sweeps with settings; a sweep recorded
    before SweepOptions.swap existed ran the callback's defaults)."""
    config = {section: {} for section in RESULT_SECTIONS}
    options = {"mode": "measure", "executor": "cpu", "host_memory": None}
    before = fingerprint(config, options)
    assert before == fingerprint(config, {**options, "swap": {}})
    assert before != fingerprint(config, {**options, "swap": {"min_tensor_bytes": 1}})
