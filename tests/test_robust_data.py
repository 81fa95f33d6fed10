"""Damaged caches, errors inside tf.data workers, and what `lmstrain data check` must reject."""

import logging

import numpy as np
import pytest
from nifti import save
from test_layouts import check, write_brats

from lmstrain.data.brats import discover_cases
from lmstrain.data.cache import VolumeCache
from lmstrain.data.pipeline import make_dataset, prepare_cases
from lmstrain.data.preprocess import Settings, preprocess_case
from lmstrain.errors import DataError

SETTINGS = Settings((16, 16, 16))


@pytest.fixture
def filled_cache(brats2021_root, tmp_path, monkeypatch):
    """Three shared cases preprocessed into a fresh cache; lmstrain's warnings reach caplog."""
    monkeypatch.setattr(logging.getLogger("lmstrain"), "propagate", True)  # the CLI turns it off
    cases = discover_cases(brats2021_root)[:3]
    cache = VolumeCache(tmp_path / "cache", SETTINGS)
    prepare_cases(cases, cache)
    return cases, cache


def truncate_entries(cache):
    entries = sorted(cache.cache_dir.glob("*.npz"))
    for f in entries:
        f.write_bytes(f.read_bytes()[:1000])
    return entries


def assert_fresh(cache, case):
    image, regions = cache.load(case)
    fresh = preprocess_case(case, SETTINGS)
    assert np.array_equal(image, fresh.image) and np.array_equal(regions, fresh.regions)


def test_truncated_cache_entries_are_rebuilt_before_training(filled_cache, caplog):
    cases, cache = filled_cache
    entries = truncate_entries(cache)
    assert prepare_cases(cases, cache) == cases
    for case, entry in zip(cases, entries):
        assert f"case {case.case_id}: cache entry {entry.name} cannot be read" in caplog.text
        assert entry.stat().st_size > 1000
        assert_fresh(cache, case)


def test_an_entry_truncated_during_a_run_is_rebuilt_by_the_tf_data_worker(filled_cache, caplog):
    cases, cache = filled_cache
    truncate_entries(cache)
    batches = list(make_dataset(cases, cache, 3, training=False))
    assert len(batches) == 1
    for i, case in enumerate(cases):
        assert f"case {case.case_id}: cache entry" in caplog.text
        fresh = preprocess_case(case, SETTINGS)
        assert np.array_equal(batches[0][0][i].numpy(), fresh.image)
        assert_fresh(cache, case)


def test_an_error_in_a_tf_data_worker_surfaces_as_one_data_error(tmp_path):
    from lmstrain.data.pipeline import input_errors

    root = tmp_path / "data"
    for i in (1, 2):
        write_brats(root, f"BraTS2021_0000{i}", f"BraTS2021_0000{i}", seed=i)
    cases = discover_cases(root)
    cache = VolumeCache(tmp_path / "cache", SETTINGS)
    t1 = root / "BraTS2021_00002" / "BraTS2021_00002_t1.nii.gz"
    t1.write_bytes(t1.read_bytes()[:100])  # broken after the checks, before training reads it
    dataset = make_dataset(cases, cache, 2, training=True)
    with pytest.raises(DataError, match=r"^case BraTS2021_00002: cannot read "
                                        r"BraTS2021_00002_t1.nii.gz"):
        with input_errors():
            next(iter(dataset))


def test_data_check_rejects_an_all_zero_case_as_fit_does(tmp_path):
    root = tmp_path / "data"
    write_brats(root, "BraTS2021_00001", "BraTS2021_00001")
    write_brats(root, "BraTS2021_00002", "BraTS2021_00002")
    for mod in ("t1", "t1ce", "t2", "flair"):
        save(np.zeros((24, 22, 20), np.int16),
             root / "BraTS2021_00002" / f"BraTS2021_00002_{mod}.nii.gz")
    with pytest.raises(DataError, match="case BraTS2021_00002: every image is empty"):
        prepare_cases(discover_cases(root), VolumeCache(tmp_path / "cache", SETTINGS))
    result = check(root)
    assert result.exit_code == 1, result.output
    assert "problem: case BraTS2021_00002: every image is empty (all zeros)" in result.output


def test_data_check_lists_files_that_match_no_case(tmp_path):
    root = tmp_path / "data"
    write_brats(root, "BraTS2021_00001", "BraTS2021_00001")
    write_brats(root, "BraTS2021_00002", "BraTS2021_00002")
    stray = root / "BraTS2021_00002" / "BraTS2021_00002_t1_old.nii.gz"
    stray.write_bytes((root / "BraTS2021_00002" / "BraTS2021_00002_t1.nii.gz").read_bytes())
    (root / "extra").mkdir()
    (root / "extra" / "mask.nii").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    result = check(root)
    assert result.exit_code == 0, result.output
    assert "ignored:  BraTS2021_00002/BraTS2021_00002_t1_old.nii.gz (matches no case of the " \
           "brats2021 layout)" in result.output
    assert "ignored:  extra/mask.nii" in result.output
    assert "notes.txt" not in result.output


FILL_CACHE = """
import sys
from lmstrain.data.brats import discover_cases
from lmstrain.data.cache import VolumeCache
from lmstrain.data.pipeline import prepare_cases
from lmstrain.data.preprocess import Settings
prepare_cases(discover_cases(sys.argv[1]), VolumeCache(sys.argv[2], Settings((16, 16, 16))))
"""


def test_two_processes_filling_one_cache_leave_every_entry_whole(brats2021_root, tmp_path):
    import subprocess
    import sys

    cache_dir = tmp_path / "shared"
    fills = [subprocess.Popen([sys.executable, "-c", FILL_CACHE, str(brats2021_root),
                               str(cache_dir)], stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for fill in fills:
        assert fill.wait(timeout=300) == 0, fill.stderr.read()
    cache = VolumeCache(cache_dir, SETTINGS)
    cases = discover_cases(brats2021_root)
    assert sorted(p.name for p in cache_dir.glob("*.npz")) == sorted(
        cache.path(c).name for c in cases)  # one entry per case, no temporary left behind
    for case in cases:
        assert cache.has(case)
        assert_fresh(cache, case)
