"""The command line, in-process: exit codes and the messages users see; what a fresh
process prints."""

import json
import os
import subprocess
import sys

import nibabel as nib
import pytest
from click.testing import CliRunner

from lmstrain.cli import main
from lmstrain.data.synth import write_dataset

COMMANDS = [["synth"], ["fit"], ["config"], ["config", "show"]]


def run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


@pytest.mark.parametrize("command", [[]] + COMMANDS)
def test_every_command_has_help_with_an_example_or_usage(command):
    result = run(*command, "--help")
    assert result.exit_code == 0
    assert "Usage: main" in result.output or "Usage: lmstrain" in result.output
    assert len(result.output.splitlines()) > 5


def test_top_level_help_teaches_the_quick_start():
    assert "lmstrain fit configs/demo.yaml" in run("--help").output


def test_unknown_key_exits_2_with_one_line_and_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epoch: 3\n")
    result = run("config", "show", path)
    assert result.exit_code == 2
    assert result.output.strip() == ("Error: unknown key 'train.epoch': did you mean "
                                     "'train.epochs'? valid keys here are epochs, batch_size, "
                                     "steps_per_epoch, seed, optimizer, learning_rate, "
                                     "lr_schedule, mixed_precision, steps_per_execution, "
                                     "distribute, devices, worker_timeout")
    assert "Traceback" not in result.output


def test_wrong_type_exits_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_size: two\n")
    result = run("fit", path)
    assert result.exit_code == 2
    assert "train.batch_size: expected an integer, got 'two'" in result.output


def test_missing_data_dir_exits_2_naming_it(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  root: nowhere\n")
    result = run("fit", path)
    assert result.exit_code == 2
    assert f"data.root {tmp_path / 'nowhere'} does not exist" in result.output
    assert "Traceback" not in result.output


def test_unset_data_root_exits_2(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train: {epochs: 1}\n")
    result = run("fit", path)
    assert result.exit_code == 2 and "data.root is not set" in result.output


def test_config_show_prints_the_resolved_config(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  root: data\n")
    result = run("config", "show", path, "--set", "train.epochs=3", "--set", "data.shape=[32,32,32]")
    assert result.exit_code == 0
    assert "  epochs: 3\n" in result.output
    assert "  shape: [32, 32, 32]\n" in result.output
    assert f"  root: {tmp_path / 'data'}\n" in result.output


def test_synth_writes_cases(tmp_path):
    result = run("synth", tmp_path / "d", "--cases", 2, "--shape", 24, 24, 24, "--naming", "brats2023")
    assert result.exit_code == 0, result.output
    assert "Wrote 2 brats2023 cases of 24x24x24" in result.output
    assert len(list((tmp_path / "d").glob("BraTS-GLI-*/*-seg.nii.gz"))) == 2


def test_synth_detail_fine_writes_the_fine_tumour(tmp_path):
    assert run("synth", tmp_path / "cli", "--cases", 1, "--shape", 24, 24, 24,
               "--detail", "fine").exit_code == 0
    write_dataset(tmp_path / "api", 1, (24, 24, 24), detail="fine")
    name = "BraTS2021_00000/BraTS2021_00000_seg.nii.gz"
    segs = [nib.load(tmp_path / d / name).get_fdata() for d in ("cli", "api")]
    assert (segs[0] == segs[1]).all()


def test_bad_flag_exits_2():
    result = run("synth", "out", "--shape", 8, 8, 8)
    assert result.exit_code == 2 and "--shape" in result.output


# --- what a fresh `lmstrain` process prints: TensorFlow's start-up lines, memory measurement ---

def lmstrain_process(*args, cwd=None):
    """Run ``python -m lmstrain.cli ARGS`` in a fresh process without the suite's TF_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    return subprocess.run([sys.executable, "-m", "lmstrain.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


STARTUP_NOISE = ["absl::InitializeLog", "oneDNN custom operations", "Could not find cuda drivers",
                 "I0000 ", "UserWarning", "shuffle"]


def test_absl_info_lines_are_dropped_and_warnings_and_errors_kept(capfd):
    from lmstrain.cli import _absl_info_dropped

    with _absl_info_dropped():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are "
                    b"written to STDERR\n"
                    b"I0000 00:00:1796224899.578304   22776 port.cc:153] oneDNN custom ...\n"
                    b"W0000 00:00:1796224899.578611   22776 a.cc:31] a warning\n"
                    b"python says\n"
                    b"E0000 00:00:1796224899.578611   22776 b.cc:52] an error\n")
    assert capfd.readouterr().err == ("W0000 00:00:1796224899.578611   22776 a.cc:31] a warning\n"
                                      "python says\n"
                                      "E0000 00:00:1796224899.578611   22776 b.cc:52] an error\n")


def test_fit_prints_no_tensorflow_startup_lines_and_can_measure_the_cpu_peak(tmp_path,
                                                                            tiny_config):
    result = lmstrain_process("fit", tiny_config(), "--measure-memory", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    noise = [line for line in result.stderr.splitlines()
             if any(word in line for word in STARTUP_NOISE)]
    assert not noise, result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    memory = json.loads((run_dir / "summary.json").read_text())["memory"]
    assert memory["measured_peak_bytes"] > 0, memory
    assert memory["measured"].startswith("measured: tf.config.experimental.get_memory_info")


def test_verbose_shows_tensorflow_startup_lines(tmp_path):
    code = ("import sys; from lmstrain.cli import main\n"
            "main(sys.argv[1:], standalone_mode=False)\n"
            "import tensorflow\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    (tmp_path / "c.yaml").write_text("")
    result = subprocess.run([sys.executable, "-c", code, "-v", "config", "show",
                             str(tmp_path / "c.yaml")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "I0000 " in result.stderr, result.stderr
