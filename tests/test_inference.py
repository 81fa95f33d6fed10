"""Map-back to the original grid, sliding windows, metrics, and evaluate/predict on a real run."""

import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from nifti import oblique_affine, phantom, save

from lmstrain.cli import main
from lmstrain.data.brats import discover_cases
from lmstrain.data.preprocess import Settings, preprocess_case
from lmstrain.data.synth import write_dataset
from lmstrain.evaluation.metrics import dice, hd95, score_regions, sensitivity
from lmstrain.evaluation.scoring import label_round_trip
from lmstrain.evaluation.inference import gaussian_weight, segment, sliding_window, write_segmentation


def round_trip(case, settings, tmp_path):
    """Predict ``case`` with its own ground truth standing in for the model's output."""
    truth_on_network_grid = preprocess_case(case, settings).regions.astype(np.float32)
    probabilities, loaded = segment(case, settings, lambda batch: truth_on_network_grid[None])
    pred = probabilities >= 0.5
    out = tmp_path / "pred.nii.gz"
    write_segmentation(case.layout.labels.from_regions(pred), loaded.affine, out)
    written = nib.load(out)
    truth = case.layout.labels.to_regions(loaded.seg)
    return score_regions(pred, truth, loaded.spacing), written, loaded


def test_crop_pad_round_trip_is_exact_on_a_flipped_affine_with_a_crop_offset(tmp_path):
    affine = oblique_affine(flip=(-1, 1, -1), angle=0.0)
    images, seg = phantom(shape=(40, 36, 32), offset=(5, -2, 3))
    root = tmp_path / "data"
    for i, mod in enumerate(("t1", "t1ce", "t2", "flair")):
        save(images[..., i], root / "BraTS2021_00001" / f"BraTS2021_00001_{mod}.nii.gz", affine)
    save(seg, root / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz", affine)
    (case,) = discover_cases(root)
    scores, written, loaded = round_trip(case, Settings((48, 32, 32), mode="crop_pad"), tmp_path)
    assert preprocess_case(case, Settings((48, 32, 32), "crop_pad")).transform.bbox[0] == (8, 40)
    for region in ("wt", "tc", "et"):
        assert scores[f"dice_{region}"] == 1.0 and scores[f"hd95_{region}"] == 0.0
    assert written.shape == (40, 36, 32) and np.allclose(written.affine, affine)
    assert np.array_equal(np.asanyarray(written.dataobj), seg)  # the release's label values


def test_resample_round_trip_is_close(tmp_path):
    write_dataset(tmp_path / "data", 1, (64, 60, 56), seed=3)
    (case,) = discover_cases(tmp_path / "data")
    scores, written, loaded = round_trip(case, Settings((32, 32, 32)), tmp_path)
    for region in ("wt", "tc", "et"):
        assert scores[f"dice_{region}"] >= 0.95, scores
    assert written.shape == (64, 60, 56) and np.allclose(written.affine, loaded.affine)


def test_sliding_window_covers_the_volume_and_blends_consistently():
    volume = np.random.default_rng(0).normal(size=(37, 20, 26, 2)).astype(np.float32)
    out = sliding_window(lambda batch: batch * 2.0, volume, (16, 16, 16), overlap=0.5)
    assert out.shape == volume.shape
    assert np.allclose(out, volume * 2.0, atol=1e-5)
    weight = gaussian_weight((16, 16, 16))
    assert weight.max() == 1.0 and weight.min() > 0 and weight[8, 8, 8] == 1.0


def test_metrics_on_hand_made_masks():
    a = np.zeros((20, 20, 20), bool)
    b = np.zeros((20, 20, 20), bool)
    a[5:10, 5:10, 5:10] = True
    b[5:10, 5:10, 7:12] = True                       # shifted by 2 voxels along z
    assert dice(a, b) == pytest.approx(2 * 75 / 250)
    assert sensitivity(a, b) == pytest.approx(75 / 125)
    assert hd95(a, b, (1, 1, 1)) == pytest.approx(2.0)
    assert hd95(a, b, (1, 1, 3)) == pytest.approx(6.0)  # spacing in mm along the shift
    empty = np.zeros_like(a)
    assert dice(empty, empty) == 1.0 and hd95(empty, empty, (1, 1, 1)) == 0.0
    assert dice(a, empty) == 0.0 and hd95(a, empty, (1, 1, 1)) == float("inf")
    assert hd95(empty, a, (1, 1, 1)) == float("inf") and sensitivity(empty, a) == 0.0


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, brats2021_root):
    """A tiny run trained for one epoch on the shared synthetic data."""
    tmp = tmp_path_factory.mktemp("run")
    config = tmp / "tiny.yaml"
    config.write_text(json.dumps({
        "data": {"root": str(brats2021_root), "shape": [16, 16, 16], "cache_dir": str(tmp / "c")},
        "model": {"base_filters": 4, "depth": 3},
        "train": {"epochs": 1, "batch_size": 2, "steps_per_epoch": 2},
        "output": {"root": str(tmp / "runs")}}))
    result = CliRunner().invoke(main, ["fit", str(config)])
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp / "runs").iterdir()
    return run_dir


def test_the_label_round_trip_is_exact_on_the_cases_own_grid_and_lower_on_a_coarser_one(
        brats2021_root):
    case = discover_cases(brats2021_root)[0]
    box = preprocess_case(case, Settings((16, 16, 16))).transform.bbox
    native = Settings(tuple(hi - lo for lo, hi in box))
    assert label_round_trip(case, native) == {"dice_wt": 1.0, "dice_tc": 1.0, "dice_et": 1.0}
    coarse = label_round_trip(case, Settings((8, 8, 8)))
    assert all(value < 1 for value in coarse.values())


def test_evaluate_scores_only_validation_cases(trained_run):
    result = CliRunner().invoke(main, ["evaluate", str(trained_run)])
    assert result.exit_code == 0, result.output
    assert "2 cases" in result.output and "WT" in result.output
    out = trained_run / "evaluation"
    rows = (out / "metrics.csv").read_text().splitlines()
    validation = json.loads((trained_run / "split.json").read_text())["validation"]
    assert [r.split(",")[0] for r in rows[1:]] == validation
    assert rows[0].startswith("case_id,dice_wt,dice_tc,dice_et,hd95_wt")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 2 and 0 <= summary["dice_wt"]["median"] <= 1
    assert (out / "boxplot.png").stat().st_size > 1000


def test_predict_writes_label_maps_on_the_input_grid(trained_run, brats2021_root, tmp_path):
    out = tmp_path / "pred"
    result = CliRunner().invoke(main, ["predict", str(trained_run), str(brats2021_root), str(out)])
    assert result.exit_code == 0, result.output
    assert "Wrote 8 segmentations" in result.output
    source = nib.load(brats2021_root / "BraTS2021_00003" / "BraTS2021_00003_t1.nii.gz")
    pred = nib.load(out / "BraTS2021_00003.nii.gz")
    assert pred.shape == source.shape and np.allclose(pred.affine, source.affine)
    assert set(np.unique(np.asanyarray(pred.dataobj))) <= {0, 1, 2, 4}
    again = CliRunner().invoke(main, ["predict", str(trained_run), str(brats2021_root), str(out)])
    assert again.exit_code == 2 and "pass --overwrite" in again.output


# --- predict: data.on_error, what was written, an unwritable output folder ----------------------

def input_with_a_broken_case(brats2021_root, tmp_path):
    """Three shared cases, the middle one with a truncated t1 image."""
    import shutil

    root = tmp_path / "input"
    for case_id in ("BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"):
        shutil.copytree(brats2021_root / case_id, root / case_id)
    t1 = root / "BraTS2021_00001" / "BraTS2021_00001_t1.nii.gz"
    t1.write_bytes(t1.read_bytes()[:100])
    return root


def test_predict_stops_before_writing_anything_under_on_error_fail(trained_run, brats2021_root,
                                                                   tmp_path):
    out = tmp_path / "pred"
    root = input_with_a_broken_case(brats2021_root, tmp_path)
    result = CliRunner().invoke(main, ["predict", str(trained_run), str(root), str(out)])
    assert result.exit_code == 2, result.output
    assert not out.exists() or not any(out.iterdir())
    assert "Error: case BraTS2021_00001: cannot read BraTS2021_00001_t1.nii.gz" in result.output
    assert "nothing written (data.on_error: fail; pass --on-error skip" in result.output
    assert "Traceback" not in result.output


def test_predict_skips_bad_cases_under_on_error_skip_and_says_what_it_wrote(
        trained_run, brats2021_root, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("on_error: fail", "on_error: skip"))
    out = tmp_path / "pred"
    root = input_with_a_broken_case(brats2021_root, tmp_path)
    result = CliRunner().invoke(main, ["predict", str(run), str(root), str(out)])
    assert result.exit_code == 0, result.output
    assert "skipping case BraTS2021_00001: cannot read" in result.output
    assert ("Wrote 2 of 3 segmentations to " + str(out) + ": BraTS2021_00000, BraTS2021_00002"
            in result.output)
    assert sorted(p.name for p in out.iterdir()) == ["BraTS2021_00000.nii.gz",
                                                     "BraTS2021_00002.nii.gz"]


def test_predict_checks_the_output_folder_before_loading_the_model(brats2021_root, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("data: {shape: [16, 16, 16]}\n")
    (run / "checkpoints" / "best.keras").write_bytes(b"not a model: must never be loaded")
    (tmp_path / "file").write_text("a file where a folder should be")
    out = tmp_path / "file" / "pred"
    result = CliRunner().invoke(main, ["predict", str(run), str(brats2021_root), str(out)])
    assert result.exit_code == 2, result.output
    assert f"Error: cannot write to {out}" in result.output
    assert "Traceback" not in result.output


def test_predict_on_a_full_disk_says_which_cases_were_written(trained_run, brats2021_root,
                                                              tmp_path, monkeypatch):
    import errno

    from lmstrain.evaluation import inference

    save_nifti, saved = inference.nib.save, []

    def save_twice_then_full(image, path):
        if len(saved) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(save_nifti(image, path))

    monkeypatch.setattr(inference.nib, "save", save_twice_then_full)
    out = tmp_path / "pred"
    result = CliRunner().invoke(main, ["predict", str(trained_run), str(brats2021_root), str(out)])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: cannot write {out}/BraTS2021_00002.nii.gz: No space "
                                    "left on device; already written: BraTS2021_00000, "
                                    "BraTS2021_00001")
    assert sorted(p.name for p in out.iterdir()) == ["BraTS2021_00000.nii.gz",
                                                     "BraTS2021_00001.nii.gz"]
