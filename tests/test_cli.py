"""The command line, in-process: exit codes and the messages users see."""

import pytest
from click.testing import CliRunner

from lmstrain.cli import main

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
                                     "lr_schedule, mixed_precision, steps_per_execution")
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


def test_bad_flag_exits_2():
    result = run("synth", "out", "--shape", 8, 8, 8)
    assert result.exit_code == 2 and "--shape" in result.output
