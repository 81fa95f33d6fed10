import nibabel as nib
import numpy as np
import pytest

from lmstrain.data.synth import write_dataset


def read(folder, name):
    return nib.load(folder / name)


def test_same_seed_same_cases_other_seed_other_cases(tmp_path):
    a = write_dataset(tmp_path / "a", 2, (24, 24, 24), seed=3)
    b = write_dataset(tmp_path / "b", 2, (24, 24, 24), seed=3)
    c = write_dataset(tmp_path / "c", 2, (24, 24, 24), seed=4)
    for name in ("BraTS2021_00001_flair.nii.gz", "BraTS2021_00001_seg.nii.gz"):
        first = read(a[1], name).get_fdata()
        assert np.array_equal(first, read(b[1], name).get_fdata())
        assert not np.array_equal(first, read(c[1], name).get_fdata())


@pytest.mark.parametrize("naming, modalities, labels", [
    ("brats2021", ("t1", "t1ce", "t2", "flair"), {0, 1, 2, 4}),
    ("brats2023", ("t1n", "t1c", "t2w", "t2f"), {0, 1, 2, 3}),
])
def test_release_naming_and_label_values(tmp_path, naming, modalities, labels):
    (folder,) = write_dataset(tmp_path, 1, (32, 28, 24), seed=0, naming=naming)
    sep = "_" if naming == "brats2021" else "-"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(f"{folder.name}{sep}{m}.nii.gz" for m in (*modalities, "seg"))
    seg = read(folder, f"{folder.name}{sep}seg.nii.gz")
    assert set(np.unique(seg.get_fdata()).astype(int)) == labels
    assert seg.shape == (32, 28, 24)
    assert np.allclose(np.abs(np.diag(seg.affine))[:3], 1.0)  # 1 mm voxels
    assert seg.header.get_xyzt_units()[0] == "mm"


def test_contrasts_look_like_mri(tmp_path):
    (folder,) = write_dataset(tmp_path, 1, (48, 48, 48), seed=0)
    seg = read(folder, "BraTS2021_00000_seg.nii.gz").get_fdata()
    image = {m: read(folder, f"BraTS2021_00000_{m}.nii.gz").get_fdata()
             for m in ("t1", "t1ce", "t2", "flair")}
    brain = image["t1"] > 0
    assert 0.2 < brain.mean() < 0.6 and (seg[~brain] == 0).all()  # skull-stripped
    enhancing, necrotic, edema = seg == 4, seg == 1, seg == 2
    # The enhancing rim lights up on t1ce, oedema is bright on FLAIR.
    assert image["t1ce"][enhancing].mean() > 1.5 * image["t1ce"][necrotic].mean()
    healthy = brain & (seg == 0)
    flair_ratio = image["flair"][edema].mean() / image["flair"][healthy].mean()
    assert flair_ratio > 1.3
    assert image["t1"][brain].std() > 0  # noise and texture, not flat
