import hashlib

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from lmstrain.data.brats import LAYOUTS
from lmstrain.data.preprocess import resize
from lmstrain.data.synth import make_case, write_dataset
from lmstrain.evaluation.metrics import dice

# sha256 of make_case((24, 24, 24), default_rng([0, 1])): the images as written (int16), then
# the tissue map, computed before the fine detail existed.
STANDARD_CASE_SHA256 = "75cf8ec70d436df2e79954a0d6dc96d25b57438769a799331c8ac30c16ca098e"


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


def test_standard_detail_writes_the_same_data_as_before():
    images, tissue = make_case((24, 24, 24), np.random.default_rng([0, 1]))
    digest = hashlib.sha256()
    for image in images:
        digest.update(image.astype(np.int16).tobytes())
    digest.update(tissue.tobytes())
    assert digest.hexdigest() == STANDARD_CASE_SHA256


def test_unknown_detail_is_refused():
    with pytest.raises(ValueError, match="detail"):
        make_case((24, 24, 24), np.random.default_rng(0), detail="coarse")


@pytest.fixture(scope="module")
def cases_96(tmp_path_factory):
    """Two fine and one standard case of 96^3: ``{detail: [(brain, seg), ...]}``."""
    root = tmp_path_factory.mktemp("synth96")
    cases = {}
    for detail, count in (("fine", 2), ("standard", 1)):
        folders = write_dataset(root / detail, count, (96, 96, 96), seed=0, detail=detail)
        cases[detail] = [(read(f, f"{f.name}_t1.nii.gz").get_fdata() > 0,
                          read(f, f"{f.name}_seg.nii.gz").get_fdata().astype(np.uint8))
                         for f in folders]
    return cases


def test_fine_tumour_has_a_thin_rim_and_lies_inside_the_brain(cases_96):
    def eroded_fraction(enhancing):  # 6-connected structuring element, 2 iterations
        return ndimage.binary_erosion(enhancing, iterations=2).sum() / enhancing.sum()

    for brain, seg in cases_96["fine"]:
        assert set(np.unique(seg)) == {0, 1, 2, 4}
        assert eroded_fraction(seg == 4) < 0.02
        assert (seg[~brain] == 0).all()
        core = np.isin(seg, (1, 4))
        assert not (core & ndimage.binary_dilation(~brain)).any()  # not clipped by the brain
        _, pieces = ndimage.label(seg == 4, structure=np.ones((3, 3, 3)))
        assert pieces >= 2  # the ring-enhancing focus and satellite nodules
    ((_, seg),) = cases_96["standard"]
    assert eroded_fraction(seg == 4) > 0.2


def round_trip_dice(mask, size):
    """Dice of ``mask`` after the trip to a ``size``^3 training grid (linear, >= 0.5) and back."""
    small = resize(mask.astype(np.float32), (size,) * 3, sitk.sitkLinear) >= 0.5
    return dice(resize(small.astype(np.float32), mask.shape, sitk.sitkLinear) >= 0.5, mask)


def test_fine_tumour_is_resolved_better_on_finer_grids(cases_96):
    for brain, seg in cases_96["fine"]:
        box = tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(brain))  # as preprocessing
        regions = LAYOUTS["brats2021"].labels.to_regions(seg[box])
        for channel, margin in ((2, 0.1), (1, 0.02)):  # ET, TC
            mask = regions[..., channel]
            assert round_trip_dice(mask, 32) < round_trip_dice(mask, 64) - margin
