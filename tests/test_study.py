"""`lmstrain study`: real fit and evaluate subprocesses at two tiny sizes, killed at a named
point, resumed, and checked against the prediction files they wrote; its refusals; the
paired comparison."""

import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from lmstrain.cli import main
from lmstrain.config import load_config
from lmstrain.data.brats import discover_cases
from lmstrain.evaluation.metrics import dice
from lmstrain.study.analysis import MIN_CASES, paired_comparison
from lmstrain.study.runner import Study, StudyOptions



def study(*args):
    return CliRunner().invoke(main, ["study", *map(str, args)])


def run_dirs(out):
    return sorted(p.name for p in (out / "runs").iterdir())


def test_a_killed_study_resumes_its_runs_and_scores_them_on_the_original_grid(
        tiny_config, brats2021_root, tmp_path, monkeypatch):
    config = tiny_config(train={"epochs": 2, "steps_per_epoch": None})
    out = tmp_path / "study"
    args = (config, "--sizes", "16,24", "--device-memory", "64MiB", "--out", out)

    # Every run is killed right after committing its first epoch: both are recorded as
    # failed, and the study goes on to the second size after the first failed.
    monkeypatch.setenv("LMSTRAIN_KILL_AT", "epoch-committed")
    result = study(*args)
    assert result.exit_code == 1, result.output
    record = json.loads((out / "study.json").read_text())
    assert not record["complete"]
    for size in record["sizes"]:
        (run,) = size["runs"]
        assert run["status"] == "failed" and run["stage"] == "training"
        assert "exit status 137" in run["error"]
    for size in record["sizes"]:
        assert size["decision"]["swapping"] is False
        assert "fits in 64.00 MiB" in size["decision"]["why"]
    killed = run_dirs(out)
    assert len(killed) == 2
    first_epochs = {name: (out / "runs" / name / "history.csv").read_text().splitlines()[1]
                    for name in killed}

    # Resumed: the same run directories continue from epoch 1, then are evaluated.
    monkeypatch.delenv("LMSTRAIN_KILL_AT")
    result = study(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert run_dirs(out) == killed
    for name, first in first_epochs.items():
        rows = (out / "runs" / name / "history.csv").read_text().splitlines()
        assert len(rows) == 3 and rows[1] == first
    record = json.loads((out / "study.json").read_text())
    assert record["complete"]
    for path in ("study.csv", "cases.csv", "dice.png", "epoch_time.png", "config.yaml"):
        assert (out / path).stat().st_size > 0, path
    assert "24 vs 16" in result.output and "too few cases" in result.output
    assert [s["runs"][0]["swapping"] for s in record["sizes"]] == [False, False]

    # Each size's predictions: the input's grid, and Dice from the files as reported.
    cases = {c.case_id: c for c in discover_cases(brats2021_root)}
    for size in record["sizes"]:
        (run,) = size["runs"]
        assert len(run["cases"]) == 2 and run["epoch_time_s"] > 0
        for case_id, scores in run["cases"].items():
            case = cases[case_id]
            source = nib.load(case.seg)
            written = nib.load(f"{run['run_dir']}/evaluation/predictions/{case_id}.nii.gz")
            assert written.shape == source.shape
            assert np.allclose(written.affine, source.affine)
            labels = case.layout.labels
            pred = labels.to_regions(np.asanyarray(written.dataobj))
            truth = labels.to_regions(np.asanyarray(source.dataobj))
            for i, region in enumerate(("wt", "tc", "et")):
                assert dice(pred[..., i], truth[..., i]) == pytest.approx(
                    scores[f"dice_{region}"], abs=1e-5)
        assert size["summary"]["dice_wt"]["mean"] == pytest.approx(
            np.mean([s["dice_wt"] for s in run["cases"].values()]))
        trip = size["label_round_trip"]  # the validation labels to the size's grid and back
        assert set(trip["cases"]) == set(run["cases"])
        assert all(0 <= trip[f"dice_{r}"] <= 1 for r in ("wt", "tc", "et"))
    assert "Label round trip" in result.output

    # Resumed again: every run is finished, nothing runs.
    logs = {p.name: p.stat().st_size for p in (out / "logs").iterdir()}
    result = study(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert {p.name: p.stat().st_size for p in (out / "logs").iterdir()} == logs


def test_a_size_swaps_when_the_prediction_exceeds_the_budget(tiny_config, tmp_path):
    config = load_config(tiny_config())
    runner = Study(config, StudyOptions(sizes=[16, 24], device_memory=10 * 2**20), tmp_path)
    small, large = (runner.decide(spec) for spec in runner.specs)
    assert small["swapping"] is False and "fits in 10.00 MiB" in small["why"]
    assert large["swapping"] is True and "exceeds 10.00 MiB" in large["why"]
    assert large["predicted_peak_bytes_without_swap"] > 10 * 2**20
    assert large["predicted_peak_bytes"] <= 10 * 2**20  # auto-tuned to the budget
    assert "lms.enabled=true" in runner.overrides(runner.specs[1], large["swapping"])


def test_repeats_share_the_split_and_differ_in_the_training_seed(tiny_config, tmp_path):
    config = load_config(tiny_config(train={"seed": 3}))
    runner = Study(config, StudyOptions(sizes=[16, 24], repeats=2), tmp_path / "s")
    assert [(s.size, s.seed) for s in runner.specs] == [(16, 3), (16, 4), (24, 3), (24, 4)]
    for spec in runner.specs:
        sets = runner.overrides(spec, False)
        assert "data.split_seed=3" in sets and f"train.seed={spec.seed}" in sets
        assert "data.resize=resample" in sets


@pytest.mark.parametrize("args, message", [
    (["--set", "data.resize=crop_pad", "--sizes", "16,24", "--out", "{out}"],
     "data.resize is crop_pad"),
    (["--sizes", "16,17", "--out", "{out}"], "give 1 distinct shape"),
    (["--sizes", "2,16", "--out", "{out}"], "--sizes 2 is below 4"),
    (["--sizes", "16,24", "--resume"], "--resume needs --out"),
])
def test_what_a_study_refuses_before_it_starts(tiny_config, tmp_path, args, message):
    out = tmp_path / "s"
    result = study(tiny_config(), *[a.format(out=out) for a in args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


def test_resume_refuses_other_options(tiny_config, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    config = load_config(tiny_config())
    record = {"options": {"sizes": [16, 24], "device_memory": None, "repeats": 1,
                          "measure_memory": False}, "config": config.to_dict(), "sizes": []}
    (out / "study.json").write_text(json.dumps(record))
    result = study(tiny_config(), "--sizes", "16,32", "--out", out, "--resume")
    assert result.exit_code == 2 and "was started with sizes [16, 24]" in result.output
    result = study(tiny_config(), "--sizes", "16,24", "--out", out)
    assert result.exit_code == 2 and "pass --resume" in result.output
    result = study(tiny_config(train={"learning_rate": 0.1}), "--sizes", "16,24", "--out", out,
                   "--resume")
    assert result.exit_code == 2 and "train.learning_rate" in result.output


def test_the_paired_test_needs_enough_cases_and_a_consistent_difference():
    rng = np.random.default_rng(0)
    base = {f"c{i}": float(v) for i, v in enumerate(rng.uniform(0.5, 0.8, 20))}
    better = {c: v + 0.05 + rng.normal(0, 0.01) for c, v in base.items()}
    noise = {c: v + rng.normal(0, 0.05) for c, v in base.items()}
    assert paired_comparison(base, better)["verdict"] == "larger size better"
    assert paired_comparison(better, base)["verdict"] == "larger size worse"
    assert paired_comparison(base, better)["p_value"] < 0.001
    assert paired_comparison(base, noise)["p_value"] > 0.05
    few = paired_comparison({c: base[c] for c in list(base)[:MIN_CASES - 1]}, better)
    assert few["verdict"] == "too few cases" and few["p_value"] is None
    assert few["n_cases"] == MIN_CASES - 1
