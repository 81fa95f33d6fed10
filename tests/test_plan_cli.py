"""``lmstrain plan``: the JSON report's keys, the text report, and bad input."""

import json

import pytest
import yaml
from click.testing import CliRunner

from lmstrain.cli import main

KEYS = {"peak_bytes_without_swap", "peak_bytes_with_swap", "op_output_peak_bytes_without_swap",
        "bound_bytes", "host_bytes_with_swap", "max_size_without_swap", "max_size_with_swap",
        "max_shape_without_swap", "max_shape_with_swap", "max_voxels_without_swap",
        "max_voxels_with_swap", "voxel_ratio", "limited_by"}


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"shape": [32, 32, 16]},
        "model": {"base_filters": 4, "depth": 3, "dropout": 0.1},
        "train": {"batch_size": 1}}))
    return path


def test_plan_json_has_every_key_and_swapping_reaches_a_larger_size(config_file):
    result = CliRunner().invoke(main, ["plan", str(config_file), "--device-memory", "32MiB",
                                       "--executor", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report) >= KEYS
    assert report["shape"] == [32, 32, 16] and report["batch"] == 1
    assert report["peak_bytes_with_swap"] < report["peak_bytes_without_swap"]
    assert report["max_size_with_swap"] > report["max_size_without_swap"] > 0
    size, shape = report["max_size_without_swap"], report["max_shape_without_swap"]
    assert shape[0] == shape[1] == size and shape[2] == size // 2 // 4 * 4  # divisor 4
    assert report["voxel_ratio"] == pytest.approx(
        report["max_voxels_with_swap"] / report["max_voxels_without_swap"])
    assert report["limited_by"] in ("device memory", "single op", "element count",
                                    "host memory")


def test_plan_text_scales_the_size_and_says_what_it_needs(config_file):
    result = CliRunner().invoke(main, ["plan", str(config_file), "--size", "64", "--batch",
                                       "2", "--executor", "cpu"])
    assert result.exit_code == 0, result.output
    assert "At 64x64x32, batch 2:" in result.output
    assert "physical bound" in result.output
    assert "pass --device-memory" in result.output


@pytest.mark.parametrize("value", ["16 apples", "-1GiB", "0"])
def test_a_bad_device_memory_exits_2(config_file, value):
    result = CliRunner().invoke(main, ["plan", str(config_file), "--device-memory", value])
    assert result.exit_code == 2
    assert "Invalid value for '--device-memory'" in result.output
