"""Turn one BraTS case into network input: load, crop to the brain, resize, normalise.

The result is a float32 ``(X, Y, Z, 4)`` image (channels t1, t1ce, t2, flair, z-scored over
brain voxels, zero outside) and uint8 ``(X, Y, Z, 3)`` WT/TC/ET region masks.
"""

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from lmstrain.errors import DataError


@dataclass
class Preprocessed:
    image: np.ndarray      # (X, Y, Z, 4) float32
    regions: np.ndarray    # (X, Y, Z, 3) uint8
    bbox: tuple            # ((x0, x1), (y0, y1), (z0, z1)) brain box in the original grid
    original_shape: tuple  # (X, Y, Z) of the original volumes


def load_case(case):
    """Read a case's four images and its segmentation; return ``(image, seg, affine)``."""
    arrays, affine = [], None
    for path in case.images + (case.seg,):
        try:
            img = nib.load(path)
            data = np.asanyarray(img.dataobj)
        except Exception as err:  # nibabel raises many types for corrupt/truncated files
            raise DataError(f"case {case.case_id}: cannot read {path.name}: {err}") from None
        if data.ndim != 3:
            raise DataError(f"case {case.case_id}: {path.name} has shape {data.shape}, "
                            "expected a 3D volume")
        if arrays and data.shape != arrays[0].shape:
            raise DataError(f"case {case.case_id}: {path.name} has shape {data.shape} but "
                            f"{case.images[0].name} has {arrays[0].shape}")
        if affine is not None and not np.allclose(img.affine, affine, atol=1e-3):
            raise DataError(f"case {case.case_id}: {path.name} is not aligned with "
                            f"{case.images[0].name} (different affine)")
        affine = img.affine if affine is None else affine
        arrays.append(data)
    image = np.stack([a.astype(np.float32) for a in arrays[:4]], axis=-1)
    seg = np.rint(arrays[4]).astype(np.int16)
    unexpected = sorted(set(np.unique(seg).tolist()) - set(case.layout.labels.values))
    if unexpected:
        raise DataError(f"case {case.case_id}: {case.seg.name} has label values {unexpected}; "
                        f"{case.layout.name} uses {list(case.layout.labels.values)}")
    return image, seg, affine


def preprocess_case(case, shape):
    """Load ``case`` and return it :class:`Preprocessed` at ``shape`` (x, y, z)."""
    image, seg, _affine = load_case(case)
    brain = np.any(image != 0, axis=-1)
    if not brain.any():
        raise DataError(f"case {case.case_id}: every image is empty (all zeros)")
    original_shape = tuple(int(s) for s in seg.shape)
    bbox = tuple((int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(brain))
    crop = tuple(slice(lo, hi) for lo, hi in bbox)
    image, seg, brain = image[crop], seg[crop], brain[crop]
    image = resize(image, shape, sitk.sitkLinear)
    seg = resize(seg, shape, sitk.sitkNearestNeighbor)
    brain = resize(brain.astype(np.uint8), shape, sitk.sitkNearestNeighbor).astype(bool)
    return Preprocessed(
        image=zscore(image, brain),
        regions=case.layout.labels.to_regions(seg),
        bbox=bbox,
        original_shape=original_shape,
    )


def resize(volume, shape, interpolator):
    """Resample ``volume`` (X, Y, Z[, C]) to ``shape`` so that both grids span the same extent."""
    shape = tuple(int(s) for s in shape)
    is_vector = volume.ndim == 4
    image = sitk.GetImageFromArray(volume, isVector=is_vector)  # SimpleITK sees (Z, Y, X)
    in_size = np.array(volume.shape[:3], dtype=float)
    spacing = in_size / np.array(shape, dtype=float)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(shape[::-1])
    resampler.SetOutputSpacing(tuple(spacing[::-1]))
    resampler.SetOutputOrigin(tuple((spacing[::-1] - 1) / 2))  # voxel edges stay aligned
    resampler.SetInterpolator(interpolator)
    resampler.SetDefaultPixelValue(0)
    return sitk.GetArrayFromImage(resampler.Execute(image))


def zscore(image, brain):
    """Normalise each channel to mean 0, std 1 over ``brain`` voxels; zero outside the brain."""
    out = np.zeros_like(image, dtype=np.float32)
    for c in range(image.shape[-1]):
        values = image[..., c][brain]
        out[..., c][brain] = (values - values.mean()) / (values.std() + 1e-8)
    return out
