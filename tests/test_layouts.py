"""Every accepted dataset layout, written as real NIfTI files with nibabel and SimpleITK."""

import nibabel as nib
import numpy as np
import pytest
from nifti import oblique_affine, phantom, save

from lmstrain.data.brats import LAYOUTS, discover_cases
from lmstrain.data.preprocess import load_case
from lmstrain.errors import DataError

MODS = ("t1", "t1ce", "t2", "flair")


def write_brats(root, case_dir, case_id, sep="_", mods=MODS, ext=".nii.gz", writer="nibabel",
                dtype=np.int16, labels=(1, 2, 4), seg_name=None, affine=None, seed=0):
    images, seg = phantom(labels=labels, seed=seed)
    for i, mod in enumerate(mods):
        save(images[..., i].astype(dtype), root / case_dir / f"{case_id}{sep}{mod}{ext}", affine,
             writer)
    save(seg, root / case_dir / (seg_name or f"{case_id}{sep}seg{ext}"), affine, writer)
    return images, seg


def test_brats2018_hgg_lgg_folders(tmp_path):
    write_brats(tmp_path, "HGG/Brats18_2013_2_1", "Brats18_2013_2_1")
    write_brats(tmp_path, "LGG/Brats18_TCIA10_103_1", "Brats18_TCIA10_103_1", dtype=np.float64)
    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["Brats18_2013_2_1", "Brats18_TCIA10_103_1"]
    assert cases[0].layout.name == "brats2018"
    image = load_case(cases[1]).image
    assert image.shape == (24, 22, 20, 4) and image.dtype == np.float32


def test_brats2020_uncompressed_with_an_oddly_named_segmentation(tmp_path):
    write_brats(tmp_path, "BraTS20_Training_001", "BraTS20_Training_001", ext=".nii")
    write_brats(tmp_path, "BraTS20_Training_355", "BraTS20_Training_355", ext=".nii",
                seg_name="W39_1998.09.19_Segm.nii")
    cases = discover_cases(tmp_path)
    assert [c.layout.name for c in cases] == ["brats2020", "brats2020"]
    assert cases[1].seg.name == "W39_1998.09.19_Segm.nii"
    assert set(np.unique(load_case(cases[1]).seg)) == {0, 1, 2, 4}


@pytest.mark.parametrize("writer", ["nibabel", "sitk"])
def test_brats2021_written_by_either_library_reads_the_same(tmp_path, writer):
    affine = oblique_affine(flip=(-1, 1, -1))
    images, seg = write_brats(tmp_path, "BraTS2021_00042", "BraTS2021_00042", writer=writer,
                              affine=affine, dtype=np.uint8)
    (case,) = discover_cases(tmp_path, "brats2021")
    loaded = load_case(case)
    # SimpleITK's (z, y, x) arrays and LPS directions come back as nibabel's (x, y, z) and RAS.
    assert np.array_equal(loaded.image, images.astype(np.uint8).astype(np.float32))
    assert np.array_equal(loaded.seg, seg)
    assert np.allclose(loaded.affine, affine, atol=1e-4)
    assert loaded.spacing == pytest.approx((1.0, 1.0, 1.0))


@pytest.mark.parametrize("prefix", ["GLI", "MEN", "MET", "PED", "SSA"])
def test_brats2023_prefixes(tmp_path, prefix):
    write_brats(tmp_path, f"BraTS-{prefix}-00001-000", f"BraTS-{prefix}-00001-000", sep="-",
                mods=("t1n", "t1c", "t2w", "t2f"), labels=(1, 2, 3))
    (case,) = discover_cases(tmp_path)
    assert case.layout.name == "brats2023"
    assert set(np.unique(load_case(case).seg)) == {0, 1, 2, 3}


@pytest.mark.parametrize("writer", ["nibabel", "sitk"])  # 4D, or SimpleITK's 5D vector image
def test_msd_4d_images_are_reordered_to_t1_t1ce_t2_flair(tmp_path, writer):
    images, seg = phantom(labels=(2, 1, 3))  # MSD: 1 oedema, 2 non-enhancing, 3 enhancing
    msd = images[..., [3, 0, 1, 2]]          # FLAIR, T1w, T1gd, T2w on disk
    root = tmp_path / "Task01_BrainTumour"
    save(msd, root / "imagesTr" / "BRATS_001.nii.gz", writer=writer)
    save(seg, root / "labelsTr" / "BRATS_001.nii.gz")
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"macOS junk")
    (case,) = discover_cases(tmp_path)
    assert case.layout.name == "msd" and case.case_id == "BRATS_001"
    loaded = load_case(case)
    assert np.array_equal(loaded.image, images)
    regions = case.layout.labels.to_regions(loaded.seg)
    assert regions[..., 2].sum() == (seg == 3).sum()           # ET = enhancing
    assert regions[..., 1].sum() == np.isin(seg, (2, 3)).sum()  # TC = core + enhancing


def test_explicit_layout_overrides_auto_and_unknown_is_explained(tmp_path):
    write_brats(tmp_path, "BraTS2021_00001", "BraTS2021_00001")
    with pytest.raises(DataError, match=r"no BraTS cases found .*data.layout: brats2023.*"
                                        r"Found: BraTS2021_00001/BraTS2021_00001_flair.nii.gz"):
        discover_cases(tmp_path, "brats2023")
    with pytest.raises(DataError, match="data.layout 'brats1999' is unknown"):
        discover_cases(tmp_path, "brats1999")
    assert set(LAYOUTS) == {"brats2018", "brats2020", "brats2021", "brats2023", "msd"}


# --- bad data: every problem names the case --------------------------------------------------

@pytest.fixture
def good_case(tmp_path):
    write_brats(tmp_path, "BraTS2021_00007", "BraTS2021_00007")
    return tmp_path / "BraTS2021_00007"


def load_only(root):
    (case,) = discover_cases(root)
    return load_case(case)


def test_corrupt_and_truncated_files(good_case):
    t1 = good_case / "BraTS2021_00007_t1.nii.gz"
    t1.write_bytes(t1.read_bytes()[: len(t1.read_bytes()) // 2])
    with pytest.raises(DataError, match=r"case BraTS2021_00007: cannot read "
                                        r"BraTS2021_00007_t1.nii.gz"):
        load_only(good_case.parent)
    t1.write_bytes(b"this is not a NIfTI file at all" * 20)
    with pytest.raises(DataError, match="cannot read BraTS2021_00007_t1.nii.gz"):
        load_only(good_case.parent)


def test_shape_and_affine_mismatch(good_case):
    flair = good_case / "BraTS2021_00007_flair.nii.gz"
    save(np.ones((24, 22, 19), np.int16), flair)
    with pytest.raises(DataError, match=r"BraTS2021_00007_flair.nii.gz has shape \(24, 22, 19\) "
                                        r"but BraTS2021_00007_t1.nii.gz has \(24, 22, 20\)"):
        load_only(good_case.parent)
    shifted = np.eye(4)
    shifted[0, 3] = 5
    save(np.ones((24, 22, 20), np.int16), flair, shifted)
    with pytest.raises(DataError, match="flair.nii.gz is not aligned with .*t1.nii.gz"):
        load_only(good_case.parent)


def test_unexpected_labels_missing_modality_and_nan(good_case):
    seg = good_case / "BraTS2021_00007_seg.nii.gz"
    save(np.full((24, 22, 20), 3, np.uint8), seg)
    with pytest.raises(DataError, match=r"has label values 0, 3; brats2021 uses \[0, 1, 2, 4\]|"
                                        r"has label values 3; brats2021 uses \[0, 1, 2, 4\]"):
        load_only(good_case.parent)
    (good_case / "BraTS2021_00007_t1ce.nii.gz").unlink()
    with pytest.raises(DataError, match="case BraTS2021_00007: missing t1ce image"):
        load_only(good_case.parent)


def test_nan_values(good_case):
    data = np.full((24, 22, 20), np.nan, np.float32)
    save(data, good_case / "BraTS2021_00007_t2.nii.gz")
    with pytest.raises(DataError, match="t2.nii.gz contains NaN or infinite values"):
        load_only(good_case.parent)


def test_nibabel_reads_affines_of_both_writers_identically(tmp_path):
    affine = oblique_affine(flip=(1, -1, 1), spacing=(0.9, 1.1, 2.0))
    data = np.arange(24 * 22 * 20, dtype=np.int16).reshape(24, 22, 20)
    a = nib.load(save(data, tmp_path / "a.nii", affine, "nibabel"))
    b = nib.load(save(data, tmp_path / "b.nii.gz", affine, "sitk"))
    assert np.allclose(a.affine, b.affine, atol=1e-4)
    assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    assert b.header.get_zooms() == pytest.approx((0.9, 1.1, 2.0))


# --- lmstrain data check and data.on_error ---------------------------------------------------

def check(root, *sets):
    from click.testing import CliRunner

    from lmstrain.cli import main

    config = root.parent / "check.yaml"
    config.write_text(f"data:\n  root: {root}\n")
    args = ["data", "check", str(config)] + [a for s in sets for a in ("--set", s)]
    return CliRunner().invoke(main, args)


def test_data_check_reports_and_exits_by_policy(tmp_path):
    root = tmp_path / "data"
    write_brats(root, "BraTS2021_00001", "BraTS2021_00001")
    write_brats(root, "BraTS2021_00002", "BraTS2021_00002", dtype=np.float64)
    result = check(root)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("2 cases (brats2021 layout)\n")
    assert "shapes:   24x22x20 (2)" in result.output
    assert "spacings: 1.0x1.0x1.0 mm (2)" in result.output
    assert "labels:   0, 1, 2, 4" in result.output

    (root / "BraTS2021_00002" / "BraTS2021_00002_t2.nii.gz").unlink()
    result = check(root)
    assert result.exit_code == 1
    assert "problem: case BraTS2021_00002: missing t2 image" in result.output
    assert check(root, "data.on_error=skip").exit_code == 0


def test_data_check_without_cases_or_with_a_bad_config_exits_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = check(tmp_path / "empty")
    assert result.exit_code == 2 and "no BraTS cases found" in result.output
    assert check(tmp_path / "empty", "data.on_error=ignore").exit_code == 2


def test_prepare_cases_skips_or_fails(tmp_path, caplog, monkeypatch):
    import logging

    from lmstrain.data.cache import VolumeCache
    from lmstrain.data.pipeline import prepare_cases
    from lmstrain.data.preprocess import Settings

    root = tmp_path / "data"
    for i in (1, 2, 3):
        write_brats(root, f"BraTS2021_0000{i}", f"BraTS2021_0000{i}", seed=i)
    save(np.full((24, 22, 20), 7, np.uint8), root / "BraTS2021_00002" / "BraTS2021_00002_seg.nii.gz")
    cases = discover_cases(root)
    cache = VolumeCache(tmp_path / "cache", Settings((16, 16, 16)))
    monkeypatch.setattr(logging.getLogger("lmstrain"), "propagate", True)  # the CLI turns it off
    with pytest.raises(DataError, match=r"BraTS2021_00002.*label values.*set data.on_error: skip"):
        prepare_cases(cases, cache, "fail")
    kept = prepare_cases(cases, cache, "skip")
    assert [c.case_id for c in kept] == ["BraTS2021_00001", "BraTS2021_00003"]
    assert "skipping case BraTS2021_00002" in caplog.text
