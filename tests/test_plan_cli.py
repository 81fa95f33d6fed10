"""``lmstrain plan``: the JSON report's keys, the text report, and bad input."""

import json

import pytest
import yaml
from click.testing import CliRunner

from lmstrain.cli import main

KEYS = {"peak_bytes_without_swap", "peak_bytes_with_swap", "op_output_peak_bytes_without_swap",
        "bound_bytes", "bound_bytes_with_swap", "host_bytes_with_swap", "max_size_without_swap",
        "max_size_with_swap",
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
    # Without swapping memory stops growth; with it the plans come down to the physical
    # bound, so the next size's single largest op is what does not fit.
    assert (report["limited_by"], report["limited_by_without_swap"]) == (
        "single op", "device memory")


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


def test_host_memory_defaults_to_the_machine_that_will_train(monkeypatch):
    from lmstrain.lms import devices
    from lmstrain.lms.devices import physical_memory
    from lmstrain.planning import sizing

    monkeypatch.setattr(devices.tf.config, "list_physical_devices", lambda kind=None: [])
    # No GPU here: the CPU executor's order is this machine's (its RAM holds the host copies);
    # the GPU executor's order plans for another machine, whose RAM is unknown: no limit.
    assert sizing.default_host_memory("cpu") == physical_memory()
    assert sizing.default_host_memory("gpu") is None
    # A GPU here: TensorFlow's pinned host allocator, as lmstrain fit sets it up.
    monkeypatch.setattr(devices.tf.config, "list_physical_devices",
                        lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    monkeypatch.delenv("TF_GPU_HOST_MEM_LIMIT_IN_MB", raising=False)
    assert sizing.default_host_memory("gpu") == physical_memory()
    monkeypatch.setenv("TF_GPU_HOST_MEM_LIMIT_IN_MB", "1024")
    assert sizing.default_host_memory("gpu") == 2**30


def test_the_text_says_when_host_memory_is_not_a_limit():
    from lmstrain.cli.tables import plan_lines

    report = {"shape": [16, 16, 16], "batch": 1, "executor": "gpu",
              "device_memory_bytes": None, "host_memory_bytes": None,
              "breakdown_without_swap": {}, "breakdown_with_swap": {},
              "op_output_peak_bytes_without_swap": 1, "op_output_peak_bytes_with_swap": 1,
              "peak_bytes_without_swap": 1, "peak_bytes_with_swap": 1,
              "peak_op_without_swap": "a", "peak_op_with_swap": "b",
              "swapped_bytes_per_step": 0, "host_bytes_with_swap": 0, "bound_bytes": 1,
              "bound_op": "a", "bound_bytes_with_swap": 1, "bound_op_with_swap": "a",
              "largest_tensor": "t", "largest_tensor_elements": 1,
              "element_limit_size": None}
    assert "host memory not limited (pass --host-memory)" in plan_lines(report)[0]


def test_size_range_limits_when_every_size_fits_and_progress_hears_each_step(config_file,
                                                                             monkeypatch):
    from lmstrain.config import load_config
    from lmstrain.planning import sizing

    config = load_config(config_file)
    monkeypatch.setattr(sizing, "candidate_shapes", lambda base, div: [(16, 16, 8), (32, 32, 16)])
    said = []
    limit = sizing.max_size(config, 1, 2**30, False, executor="cpu", host_memory=None,
                            progress=said.append)
    assert limit.shape == (32, 32, 16)
    assert limit.limited_by == sizing.SIZE_RANGE and limit.next_shape is None
    # The progress bar of `plan` hears of every step of the search, before it runs.
    assert said[0] == "two small sizes without swapping, to extrapolate from"
    assert said[-1] == "32x32x16 without swapping"
