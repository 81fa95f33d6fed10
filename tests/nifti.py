"""Write small NIfTI volumes with nibabel or SimpleITK, as the test datasets need."""

import nibabel as nib
import numpy as np
import SimpleITK as sitk


def save(array, path, affine=None, writer="nibabel"):
    """Write ``array`` (axes x, y, z[, c]) with a RAS ``affine`` using nibabel or SimpleITK."""
    affine = np.eye(4) if affine is None else np.asarray(affine, float)
    path.parent.mkdir(parents=True, exist_ok=True)
    if writer == "nibabel":
        image = nib.Nifti1Image(array, affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        nib.save(image, path)
        return path
    # SimpleITK indexes arrays (z, y, x) and works in LPS; NIfTI affines are RAS.
    vector = array.ndim == 4
    data = np.transpose(array, (2, 1, 0, 3) if vector else (2, 1, 0))
    image = sitk.GetImageFromArray(np.ascontiguousarray(data), isVector=vector)
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    image.SetSpacing(tuple(spacing))
    image.SetDirection(tuple((lps / spacing).flatten()))
    image.SetOrigin(tuple(np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]))
    sitk.WriteImage(image, str(path))
    return path


def phantom(shape=(24, 22, 20), offset=(0, 0, 0), labels=(1, 2, 4), seed=0):
    """Four images and a segmentation: a box-shaped brain with a layered tumour at ``offset``."""
    rng = np.random.default_rng(seed)
    images = np.zeros(shape + (4,), np.float32)
    seg = np.zeros(shape, np.uint8)
    brain = tuple(slice(3 + o, s - 3 + o) for s, o in zip(shape, offset))
    images[brain] = rng.uniform(50, 150, images[brain].shape)
    centre = [(sl.start + sl.stop) // 2 for sl in brain]
    grid = np.indices(shape)
    r = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    necrotic, edema, enhancing = labels
    seg[r < 6] = edema
    seg[r < 4] = enhancing
    seg[r < 2] = necrotic
    return images, seg


def oblique_affine(flip=(1, 1, 1), angle=0.3, spacing=(1.0, 1.0, 1.0)):
    """A rotated, flipped, translated affine."""
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(np.array(flip) * np.array(spacing))
    affine[:3, 3] = [-90.5, 110.25, -72.0]
    return affine
