"""Turn one BraTS case into network input, and map network output back to the case's grid.

Steps: load the four images (nibabel) and check they agree; crop to the union non-zero
bounding box; optionally correct the bias field (SimpleITK N4); z-score each channel over
brain voxels; bring the box to the network's ``shape`` by resampling (SimpleITK: linear for
images, linear-then-threshold for labels) or by centred crop/pad at native resolution. The
:class:`Transform` recorded per case inverts the last two steps exactly, so predictions land in
the original voxel grid (same shape and affine as the input files).
"""

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from lmstrain.errors import DataError


@dataclass(frozen=True)
class Settings:
    """What preprocessing does; part of the cache key."""

    shape: tuple                 # network grid (x, y, z)
    mode: str = "resample"       # "resample" the brain box to shape, or "crop_pad" it
    n4: bool = False             # N4 bias-field correction

    @classmethod
    def from_config(cls, config, shape=None):
        d = config.data
        return cls(tuple(int(s) for s in (shape or d.shape)), d.resize, d.n4)


@dataclass(frozen=True)
class Transform:
    """Where the network grid sits in the original volume."""

    original_shape: tuple        # (X, Y, Z) of the input files
    bbox: tuple                  # ((x0, x1), (y0, y1), (z0, z1)) brain box in the original grid


@dataclass
class Loaded:
    image: np.ndarray            # (X, Y, Z, 4) float32, channels t1, t1ce, t2, flair
    seg: np.ndarray              # (X, Y, Z) int16 label map, or None
    affine: np.ndarray
    spacing: tuple               # voxel size in mm along the array's axes (nibabel zooms)
    dtype: str                   # data type of the image files on disk


@dataclass
class Preprocessed:
    image: np.ndarray            # (*shape, 4) float32, z-scored, zero outside the brain
    regions: np.ndarray          # (*shape, 3) uint8 WT/TC/ET, or None without a segmentation
    transform: Transform


def load_case(case, with_seg=True):
    """Read and check a case: every file readable, same shape and affine, finite values, not
    every image empty, and label values of the case's release. Raises :class:`DataError` naming
    the case and file. Training, prediction and ``data check`` all load cases through it."""
    if case.missing:
        raise DataError(f"case {case.case_id}: missing {', '.join(case.missing)} image"
                        f"{'s' if len(case.missing) > 1 else ''}")
    if with_seg and case.seg is None:
        raise DataError(f"case {case.case_id}: no segmentation file found")
    paths = case.images + ((case.seg,) if with_seg else ())
    arrays, reference = [], None
    for path in paths:
        img, data = _read(case, path)
        if data.ndim == 5 and data.shape[3] == 1:  # NIfTI vector images (SimpleITK): x,y,z,1,c
            data = data[:, :, :, 0]
        expected_ndim = 4 if case.channels and path != case.seg else 3
        if data.ndim != expected_ndim or (expected_ndim == 4 and data.shape[3] < 4):
            raise DataError(f"case {case.case_id}: {path.name} has shape {data.shape}, expected "
                            f"a {'4D volume with 4 channels' if expected_ndim == 4 else '3D volume'}")
        if reference is None:
            reference = (path, img)
        elif data.shape[:3] != reference[1].shape[:3]:
            raise DataError(f"case {case.case_id}: {path.name} has shape {data.shape[:3]} but "
                            f"{reference[0].name} has {reference[1].shape[:3]}")
        elif not np.allclose(img.affine, reference[1].affine, atol=1e-3):
            raise DataError(f"case {case.case_id}: {path.name} is not aligned with "
                            f"{reference[0].name}: their affines differ")
        if not np.isfinite(data).all():
            raise DataError(f"case {case.case_id}: {path.name} contains NaN or infinite values")
        arrays.append(data)
    if case.channels:
        image = arrays[0][..., list(case.channels)].astype(np.float32)
    else:
        image = np.stack([a.astype(np.float32) for a in arrays[:4]], axis=-1)
    if not image.any():  # no brain to crop to and normalise
        raise DataError(f"case {case.case_id}: every image is empty (all zeros)")
    seg = None
    if with_seg:
        seg = arrays[-1]
        labels = np.unique(seg)
        allowed = case.layout.labels.values
        unexpected = [v for v in labels.tolist() if v not in allowed]
        if unexpected:
            raise DataError(f"case {case.case_id}: {case.seg.name} has label values "
                            f"{_short(unexpected)}; {case.layout.name} uses {list(allowed)}")
        seg = seg.astype(np.int16)
    zooms = tuple(float(z) for z in reference[1].header.get_zooms()[:3])
    return Loaded(image, seg, reference[1].affine, zooms, str(reference[1].get_data_dtype()))


def preprocess_case(case, settings, with_seg=True):
    """Load ``case`` and return it :class:`Preprocessed` on the network grid."""
    box, regions, transform = normalized_box(load_case(case, with_seg), case, settings)
    image = network_image(box, settings)
    if regions is not None:
        regions = network_regions(regions, settings)
    return Preprocessed(image, regions, transform)


def network_regions(regions, settings):
    """WT/TC/ET masks of the brain box on the network grid, as training sees them: linear
    interpolation, then threshold 0.5."""
    return (to_network_grid(regions.astype(np.float32), settings, sitk.sitkLinear)
            >= 0.5).astype(np.uint8)


def network_image(box, settings):
    """The normalised brain box on the network grid, background exactly zero."""
    image = to_network_grid(box, settings, sitk.sitkLinear)
    if settings.mode == "resample":
        brain = np.any(box != 0, axis=-1).astype(np.uint8)
        image[to_network_grid(brain, settings, sitk.sitkNearestNeighbor) == 0] = 0
    return image


def normalized_box(loaded, case, settings):
    """The brain box at native resolution, bias-corrected if asked and z-scored, with its
    WT/TC/ET regions (None without a segmentation) and the :class:`Transform`."""
    box, seg, transform = crop_to_brain(loaded)
    if settings.n4:
        box = n4_correct(box)
    box = zscore(box, np.any(box != 0, axis=-1))
    regions = case.layout.labels.to_regions(seg) if seg is not None else None
    return box, regions, transform


def crop_to_brain(loaded):
    """Crop image and segmentation to the union non-zero bounding box of the four images."""
    brain = np.any(loaded.image != 0, axis=-1)  # never empty: load_case checks
    bbox = tuple((int(i.min()), int(i.max()) + 1) for i in np.nonzero(brain))
    crop = tuple(slice(lo, hi) for lo, hi in bbox)
    seg = loaded.seg[crop] if loaded.seg is not None else None
    return loaded.image[crop], seg, Transform(tuple(loaded.image.shape[:3]), bbox)


def to_network_grid(volume, settings, interpolator):
    """Brain box ``(X, Y, Z[, C])`` -> ``settings.shape``, by resampling or crop/pad."""
    if settings.mode == "crop_pad":
        return _crop_pad(volume, settings.shape)
    return resize(volume, settings.shape, interpolator)


def restore(volume, transform, settings, interpolator=sitk.sitkLinear):
    """Network-grid ``volume`` ``(*shape[, C])`` -> the original grid, zero outside the box."""
    box_shape = tuple(hi - lo for lo, hi in transform.bbox)
    if settings.mode == "crop_pad":
        return paste(_crop_pad(volume, box_shape), transform)
    return paste(resize(volume, box_shape, interpolator), transform)


def paste(box, transform):
    """Place a brain-box volume ``(X, Y, Z[, C])`` into the original grid, zero elsewhere."""
    out = np.zeros(transform.original_shape + box.shape[3:], dtype=box.dtype)
    out[tuple(slice(lo, hi) for lo, hi in transform.bbox)] = box
    return out


def resize(volume, shape, interpolator):
    """Resample ``volume`` (X, Y, Z[, C]) to ``shape`` so that both grids span the same extent."""
    shape = tuple(int(s) for s in shape)
    if tuple(volume.shape[:3]) == shape:
        return volume.copy()
    image = sitk.GetImageFromArray(volume, isVector=volume.ndim == 4)  # SimpleITK sees (Z, Y, X)
    spacing = np.array(volume.shape[:3], dtype=float) / np.array(shape, dtype=float)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(shape[::-1])
    resampler.SetOutputSpacing(tuple(spacing[::-1]))
    resampler.SetOutputOrigin(tuple((spacing[::-1] - 1) / 2))  # voxel edges stay aligned
    resampler.SetInterpolator(interpolator)
    resampler.SetDefaultPixelValue(0)
    return sitk.GetArrayFromImage(resampler.Execute(image))


def _crop_pad(volume, shape):
    """Centre ``volume`` in ``shape``: crop where it is larger, zero-pad where it is smaller.

    Applying it with the box shape inverts it exactly (both use the same centring rule).
    """
    out = np.zeros(tuple(shape) + volume.shape[3:], dtype=volume.dtype)
    src, dst = [], []
    for have, want in zip(volume.shape[:3], shape):
        if have >= want:
            start = (have - want) // 2
            src.append(slice(start, start + want))
            dst.append(slice(0, want))
        else:
            start = (want - have) // 2
            src.append(slice(0, have))
            dst.append(slice(start, start + have))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def zscore(image, brain):
    """Normalise each channel to mean 0, std 1 over ``brain`` voxels; zero outside the brain."""
    out = np.zeros_like(image, dtype=np.float32)
    for c in range(image.shape[-1]):
        values = image[..., c][brain]
        out[..., c][brain] = (values - values.mean()) / (values.std() + 1e-8)
    return out


def n4_correct(image, shrink=4):
    """N4 bias-field correction (SimpleITK) of each channel, fitted on a shrunken copy."""
    out = np.empty_like(image, dtype=np.float32)
    for c in range(image.shape[-1]):
        channel = sitk.GetImageFromArray(image[..., c].astype(np.float32))
        mask = sitk.GetImageFromArray((image[..., c] > 0).astype(np.uint8))
        small = sitk.Shrink(channel, [shrink] * 3)
        small_mask = sitk.Shrink(mask, [shrink] * 3)
        corrector = sitk.N4BiasFieldCorrectionImageFilter()
        corrector.Execute(small, small_mask)
        log_field = corrector.GetLogBiasFieldAsImage(channel)
        out[..., c] = image[..., c] / np.exp(sitk.GetArrayFromImage(log_field))
    return out


def _read(case, path):
    """Return ``(image, data)``; a corrupt or truncated file is a DataError naming it."""
    try:
        img = nib.load(path)
        return img, np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel, gzip and zlib raise many types for corrupt files
        raise DataError(f"case {case.case_id}: cannot read {path.name}: {err}") from None


def _short(values, n=6):
    return ", ".join(map(str, values[:n])) + (" ..." if len(values) > n else "")
