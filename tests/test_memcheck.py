"""``lmstrain fit``'s memory check: lms.enabled: auto decided by the simulator, predicted and
measured peaks side by side in summary.json."""

import json

from click.testing import CliRunner

from lmstrain.cli import main
from lmstrain.config import config_from_dict
from lmstrain.training.memcheck import check


def test_auto_swaps_when_the_predicted_peak_exceeds_the_budget(tmp_path, tiny_config):
    path = tiny_config(lms={"enabled": "auto", "device_memory": "1MiB"})
    result = CliRunner().invoke(main, ["fit", str(path)])
    assert result.exit_code == 0, result.output
    (run_dir,) = sorted((tmp_path / "runs").iterdir())
    memory = json.loads((run_dir / "summary.json").read_text())["memory"]
    assert memory["swapping"] is True and "turns swapping on" in memory["decision"]
    assert memory["budget_bytes"] == 2**20
    assert memory["predicted_peak_bytes"] < memory["predicted_peak_bytes_without_swap"]
    assert memory["predicted"].startswith("simulated before training")
    # The suite's TensorFlow runs without TF_CPU_ALLOCATOR_USE_BFC: no allocator statistics.
    assert memory["measured_peak_bytes"] is None
    assert "TF_CPU_ALLOCATOR_USE_BFC=true" in memory["measured"]
    assert (run_dir / "lms_plan.json").exists()


def test_auto_on_a_cpu_without_a_budget_stays_off_and_says_why():
    config = config_from_dict({"data": {"shape": [16, 16, 16]},
                               "model": {"base_filters": 4, "depth": 3},
                               "lms": {"enabled": "auto"}})
    result = check(config)
    assert result.swap is False and result.budget is None
    assert "no budget to compare with on a CPU (set lms.device_memory)" in result.decision
    assert result.record(None, "not measured")["predicted_peak_bytes"] > 0


def test_a_step_predicted_not_to_fit_warns_when_swapping_is_off():
    config = config_from_dict({"data": {"shape": [16, 16, 16]},
                               "model": {"base_filters": 4, "depth": 3},
                               "lms": {"device_memory": "1MiB"}})
    result = check(config)
    assert result.swap is False
    assert result.decision.startswith("warning: predicted peak")
    assert "Set lms.enabled: true (or auto)" in result.decision
