import numpy as np
import pytest

from lmstrain.data.brats import BRATS_2017_LABELS, BRATS_2023_LABELS, discover_cases
from lmstrain.data.cache import VolumeCache
from lmstrain.data.preprocess import Settings, preprocess_case
from lmstrain.data.split import load_split, save_split, split_cases
from lmstrain.errors import DataError


def test_discovers_brats2021_and_2023(brats2021_root, brats2023_root):
    cases = discover_cases(brats2021_root)
    assert [c.case_id for c in cases][:2] == ["BraTS2021_00000", "BraTS2021_00001"]
    assert len(cases) == 8
    assert [p.name for p in cases[0].images] == [
        "BraTS2021_00000_t1.nii.gz", "BraTS2021_00000_t1ce.nii.gz",
        "BraTS2021_00000_t2.nii.gz", "BraTS2021_00000_flair.nii.gz"]
    cases23 = discover_cases(brats2023_root, "brats2023")
    assert len(cases23) == 4 and cases23[0].layout.name == "brats2023"
    assert [p.name.split("-")[-1] for p in cases23[0].images] == [
        "t1n.nii.gz", "t1c.nii.gz", "t2w.nii.gz", "t2f.nii.gz"]
    assert discover_cases(brats2023_root, "auto")[0].layout.name == "brats2023"


def test_no_cases_lists_what_was_found(tmp_path):
    (tmp_path / "scan.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"no BraTS cases found under .*Found: scan.nii.gz"):
        discover_cases(tmp_path)
    with pytest.raises(DataError, match="no BraTS cases"):
        discover_cases(tmp_path, "brats2021")


@pytest.mark.parametrize("scheme, seg", [
    (BRATS_2017_LABELS, [0, 1, 2, 4]),
    (BRATS_2023_LABELS, [0, 1, 2, 3]),
])
def test_label_schemes_map_to_nested_regions_and_back(scheme, seg):
    seg = np.array(seg, dtype=np.uint8).reshape(4, 1, 1)
    regions = scheme.to_regions(seg)
    # background, necrotic, oedema, enhancing -> (WT, TC, ET)
    assert regions[:, 0, 0].tolist() == [[0, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert np.array_equal(scheme.from_regions(regions), seg)


def test_preprocess_crops_resizes_and_normalises(brats2021_root):
    case = discover_cases(brats2021_root)[0]
    out = preprocess_case(case, Settings((24, 16, 20)))
    assert out.image.shape == (24, 16, 20, 4) and out.image.dtype == np.float32
    assert out.regions.shape == (24, 16, 20, 3) and out.regions.dtype == np.uint8
    brain = np.any(out.image != 0, axis=-1)
    for c in range(4):  # z-scored at native resolution, then resampled: close to 0 / 1
        values = out.image[..., c][brain]
        assert abs(values.mean()) < 0.15 and abs(values.std() - 1) < 0.15
    wt, tc, et = (out.regions[..., i].astype(bool) for i in range(3))
    assert et.any() and (et <= tc).all() and (tc <= wt).all()
    # The brain box is smaller than the volume: the crop removed background.
    bbox, shape = out.transform.bbox, out.transform.original_shape
    assert all(hi - lo < 32 for lo, hi in bbox) and shape == (32, 32, 32)


def test_crop_pad_keeps_native_voxels_and_exact_zscore(brats2021_root):
    case = discover_cases(brats2021_root)[0]
    out = preprocess_case(case, Settings((32, 32, 32), mode="crop_pad"))
    brain = np.any(out.image != 0, axis=-1)
    box = tuple(hi - lo for lo, hi in out.transform.bbox)
    assert brain.sum() > 0.5 * np.prod(box)
    for c in range(4):
        values = out.image[..., c][brain]
        assert abs(values.mean()) < 1e-4 and abs(values.std() - 1) < 1e-4


def test_cache_reuses_entries_and_keys_on_shape(brats2021_root, tmp_path):
    case = discover_cases(brats2021_root)[0]
    cache = VolumeCache(tmp_path, Settings((16, 16, 16)))
    image, regions = cache.load(case)
    entry = cache.path(case)
    assert entry.exists() and entry.parent == tmp_path
    again, _ = cache.load(case)
    assert np.array_equal(image, again)
    assert VolumeCache(tmp_path, Settings((32, 16, 16))).path(case) != entry
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_split_is_seeded_disjoint_and_saved(brats2021_root, tmp_path):
    cases = discover_cases(brats2021_root)
    train, val = split_cases(cases, 0.25, seed=5)
    assert len(val) == 2 and len(train) == 6
    assert not {c.case_id for c in train} & {c.case_id for c in val}
    assert split_cases(cases, 0.25, seed=5) == (train, val)
    assert split_cases(cases, 0.25, seed=6) != (train, val)
    save_split(tmp_path / "split.json", train, val, seed=5)
    assert load_split(tmp_path / "split.json", cases) == (train, val)
    with pytest.raises(DataError, match="names cases that are not in data.root"):
        load_split(tmp_path / "split.json", cases[:3])


def test_pipeline_batches_and_flips_image_and_labels_together(brats2021_root, tmp_path):
    from lmstrain.data.pipeline import make_dataset

    cases = discover_cases(brats2021_root)[:4]
    cache = VolumeCache(tmp_path, Settings((16, 16, 16)))
    train = make_dataset(cases, cache, 2, training=True, seed=0, flip=True)
    originals = {}
    for case in cases:
        image, regions = cache.load(case)
        originals[image.tobytes()] = regions
    flipped_seen = 0
    for image, regions in train.take(6):
        assert image.shape == (2, 16, 16, 16, 4) and regions.shape == (2, 16, 16, 16, 3)
        for img, reg in zip(image.numpy(), regions.numpy()):
            # Undo every combination of flips: exactly one must give back a cached case,
            # and its labels must have been flipped the same way.
            matches = []
            for axes in [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]:
                key = np.flip(img, axes).tobytes() if axes else img.tobytes()
                if key in originals:
                    matches.append(axes)
                    assert np.array_equal(np.flip(reg, axes) if axes else reg, originals[key])
            assert matches
            flipped_seen += matches[0] != ()
    assert flipped_seen > 0
    val = make_dataset(cases, cache, 3, training=False)
    assert [b[0].shape[0] for b in val] == [3, 1]


def test_n4_removes_a_smooth_bias_field():
    from lmstrain.data.preprocess import n4_correct

    rng = np.random.default_rng(0)
    grid = np.indices((40, 40, 40)).astype(np.float32) / 40
    brain = ((grid - 0.5) ** 2).sum(0) < 0.16
    tissue = np.where(brain, 100.0, 0.0) + rng.normal(0, 1, brain.shape) * brain
    bias = np.exp(0.4 * (grid[0] - 0.5) + 0.3 * (grid[2] - 0.5))
    image = np.stack([tissue * bias] * 4, axis=-1).astype(np.float32)
    corrected = n4_correct(image)

    def spread(volume):  # coefficient of variation inside the uniform tissue
        return volume[brain].std() / volume[brain].mean()

    assert spread(corrected[..., 0]) < 0.5 * spread(image[..., 0])


def test_training_order_is_a_permutation_per_pass_whatever_the_iterator():
    from lmstrain.data.pipeline import case_order

    order = case_order(6, seed=3)
    first = [int(i) for i in order.take(18)]
    assert [int(i) for i in order.take(18)] == first  # a second iterator sees the same order
    passes = [first[i:i + 6] for i in (0, 6, 12)]
    assert all(sorted(p) == list(range(6)) for p in passes)
    assert len({tuple(p) for p in passes}) > 1  # and each pass is shuffled anew
    assert [int(i) for i in case_order(6, seed=4).take(6)] != first[:6]
