"""Synthetic BraTS-format cases: a brain-like phantom with a tumour, in four MR contrasts.

Each case is a skull-stripped ellipsoidal brain with white matter, grey matter and CSF
(ventricles and an outer rim), and a tumour. Every modality has its own tissue contrasts, a
smooth multiplicative bias field and Rician noise. Cases are deterministic per (seed, case
index). The brain scales with the grid; the tumour's detail is one of :data:`DETAILS`:

- ``standard``: sized relative to the grid, a necrotic core in a thick enhancing rim,
  surrounded by oedema.
- ``fine``: sized in mm (the grid is 1 mm) whatever the grid, with structure that a coarse
  network grid cannot resolve. The lesion is a solid non-enhancing tumour mass with its own
  contrasts, labelled as necrotic/non-enhancing core (label 1). Inside it sits a
  ring-enhancing focus, a thin enhancing rim directly around a small necrotic core, as in a
  diffuse glioma with a focal high-grade part. Oedema surrounds the lesion and small
  enhancing satellite nodules sit in the oedema. The lesion is placed deep enough to lie
  inside the brain (on a grid too small for it: at the deepest point, clipped at the brain
  surface). The sizes are the ``_FINE_*`` constants, chosen from anatomy.
"""

from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from lmstrain.atomic import atomic_path
from lmstrain.data.brats import LAYOUTS

# Mean intensity per tissue, per modality (t1, t1ce, t2, flair), on a 0..1 scale.
_TISSUES = ("background", "csf", "gm", "wm", "necrotic", "edema", "enhancing", "nonenhancing")
_CONTRAST = np.array([
    # bg   csf   gm    wm    necr  edema enh   non-enh
    [0.0, 0.25, 0.55, 0.75, 0.30, 0.45, 0.55, 0.35],  # t1
    [0.0, 0.25, 0.55, 0.75, 0.25, 0.45, 1.00, 0.38],  # t1ce
    [0.0, 1.00, 0.60, 0.45, 0.90, 0.85, 0.70, 0.75],  # t2
    [0.0, 0.15, 0.55, 0.45, 0.50, 0.95, 0.75, 0.75],  # flair
], dtype=np.float32)

DETAILS = ("standard", "fine")

# The fine tumour, in mm: (low, high) ranges drawn uniformly per case.
_FINE_LESION_RADIUS = (8.0, 14.0)      # non-enhancing tumour mass
_FINE_STRETCH = (0.85, 1.15)           # per-axis factor on the lesion radius
_FINE_CORE_RADIUS = (2.0, 4.0)         # necrotic core of the ring-enhancing focus
_FINE_RIM = (1.5, 2.5)                 # enhancing rim thickness around the core
_FINE_EDEMA_SCALE = (1.4, 1.8)         # oedema radius / lesion radius
_FINE_SATELLITES = (1, 3)              # number of enhancing nodules in the oedema
_FINE_SATELLITE_RADIUS = (1.5, 3.0)
_FINE_WOBBLE_MM = 4.0                  # correlation length of the boundary wobble
_FINE_WOBBLE = 0.1                     # relative radius std of the wobble, cut at 2 std


def case_id(naming, index):
    """The case id a release would use for case number ``index``."""
    if naming == "brats2021":
        return f"BraTS2021_{index:05d}"
    if naming == "brats2023":
        return f"BraTS-GLI-{index:05d}-000"
    raise ValueError(f"naming must be brats2021 or brats2023, got {naming!r}")


def write_dataset(out_dir: Path | str, cases: int, shape: Sequence[int], seed: int = 0,
                  naming: str = "brats2021", progress: Callable[[], object] | None = None,
                  detail: str = "standard") -> list[Path]:
    """Write ``cases`` synthetic cases under ``out_dir``; return the case folders.

    ``progress`` is an optional callable invoked once per written case; ``detail`` is one of
    :data:`DETAILS`.
    """
    out_dir = Path(out_dir)
    layout = LAYOUTS[naming]
    folders = []
    for index in range(cases):
        cid = case_id(naming, index)
        folder = out_dir / cid
        folder.mkdir(parents=True, exist_ok=True)
        images, tissue = make_case(shape, np.random.default_rng([seed, index]), detail)
        affine = brats_affine(shape)
        for modality, image in zip(layout.modalities, images):
            _save(image.astype(np.int16), affine, folder / f"{cid}{layout.separator}{modality}.nii.gz")
        seg = _labels(tissue, layout.labels)
        _save(seg, affine, folder / f"{cid}{layout.separator}seg.nii.gz")
        folders.append(folder)
        if progress:
            progress()
    return folders


def brats_affine(shape):
    """1 mm isotropic affine oriented like the BraTS releases (x and y flipped, LPS)."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[1, 3] = shape[1] - 1
    return affine


def make_case(shape: Sequence[int], rng: np.random.Generator,
              detail: str = "standard") -> tuple[list[np.ndarray], np.ndarray]:
    """Return ``(images, tissue)``: four (X, Y, Z) float32 images and an int8 tissue map,
    with a tumour of ``detail`` (one of :data:`DETAILS`)."""
    if detail not in DETAILS:
        raise ValueError(f"detail must be one of {', '.join(DETAILS)}, got {detail!r}")
    shape = tuple(int(s) for s in shape)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    tissue = _brain(grid, shape, rng)
    if detail == "fine":
        _add_fine_tumour(tissue, rng)
    else:
        _add_tumour(tissue, grid, rng)
    images = []
    for contrast in _CONTRAST:
        image = contrast[tissue] * rng.uniform(0.9, 1.1)
        image = ndimage.gaussian_filter(image, 0.6)             # partial volume
        image *= _smooth_field(shape, rng, amplitude=0.25)      # bias field
        sigma = 0.03
        image = np.hypot(image + rng.normal(0, sigma, shape), rng.normal(0, sigma, shape))
        image[tissue == 0] = 0                                   # skull-stripped
        images.append((image * rng.uniform(600, 1400)).astype(np.float32))
    return images, tissue


def _brain(grid, shape, rng):
    radii = np.array([0.78, 0.85, 0.75]) * rng.uniform(0.92, 1.05, 3)
    r = np.sqrt(sum((g / a) ** 2 for g, a in zip(grid, radii)))
    r = r + 0.05 * _smooth_noise(shape, rng)                     # wobbly cortex
    tissue = np.zeros(shape, np.int8)
    tissue[r < 1.0] = _TISSUES.index("csf")
    tissue[r < 0.95] = _TISSUES.index("gm")
    tissue[r < 0.75 + 0.06 * _smooth_noise(shape, rng)] = _TISSUES.index("wm")
    for side in (-1, 1):                                         # lateral ventricles
        v = ((grid[0] - side * 0.12) / 0.08) ** 2 + (grid[1] / 0.3) ** 2 + ((grid[2] - 0.05) / 0.15) ** 2
        tissue[v < 1.0] = _TISSUES.index("csf")
    return tissue


def _add_tumour(tissue, grid, rng):
    brain = tissue > 0
    centre = rng.uniform(-0.35, 0.35, 3)
    radius = rng.uniform(0.2, 0.32)
    stretch = rng.uniform(0.8, 1.25, 3)
    d = np.sqrt(sum(((g - c) / s) ** 2 for g, c, s in zip(grid, centre, stretch)))
    d = d * (1.0 + 0.15 * _smooth_noise(tissue.shape, rng))
    rim = rng.uniform(0.35, 0.5)
    tissue[brain & (d < radius * rng.uniform(1.4, 1.8))] = _TISSUES.index("edema")
    tissue[brain & (d < radius)] = _TISSUES.index("enhancing")
    tissue[brain & (d < radius * (1 - rim))] = _TISSUES.index("necrotic")


def _add_fine_tumour(tissue, rng):
    """Paint the fine tumour (see the module docstring); distances in mm = voxels."""
    brain = tissue > 0
    depth = ndimage.distance_transform_edt(brain)
    radius = rng.uniform(*_FINE_LESION_RADIUS)
    stretch = rng.uniform(*_FINE_STRETCH, 3)
    reach = radius * stretch.max() / (1 - 2 * _FINE_WOBBLE)  # no lesion voxel lies further
    centre = _pick(depth >= reach + 1, depth, rng)
    axes = np.ogrid[tuple(slice(0, s) for s in tissue.shape)]
    wobble = 1 + np.clip(_FINE_WOBBLE * _unit_noise(tissue.shape, _FINE_WOBBLE_MM, rng),
                         -2 * _FINE_WOBBLE, 2 * _FINE_WOBBLE)
    d = np.sqrt(sum(((x - c) / s) ** 2 for x, c, s in zip(axes, centre, stretch))) * wobble
    edema = radius * rng.uniform(*_FINE_EDEMA_SCALE)
    tissue[brain & (d < edema)] = _TISSUES.index("edema")
    tissue[brain & (d < radius)] = _TISSUES.index("nonenhancing")
    for _ in range(rng.integers(_FINE_SATELLITES[0], _FINE_SATELLITES[1] + 1)):
        r = rng.uniform(*_FINE_SATELLITE_RADIUS)
        where = (d >= radius + r + 1) & (d < edema) & (depth >= r + 1)
        if where.any():
            nodule = _distance(axes, _pick(where, depth, rng)) < r
            tissue[brain & nodule] = _TISSUES.index("enhancing")
    core = rng.uniform(*_FINE_CORE_RADIUS)
    outer = core + rng.uniform(*_FINE_RIM)
    # The focus sits anywhere the lesion surely surrounds it.
    room = max(radius * stretch.min() / (1 + 2 * _FINE_WOBBLE) - outer - 1, 0.0)
    direction = rng.normal(size=3)
    focus = np.asarray(centre) + direction / np.linalg.norm(direction) * rng.uniform(0, room)
    r_focus = _distance(axes, focus)
    tissue[brain & (r_focus < outer)] = _TISSUES.index("enhancing")
    tissue[brain & (r_focus < core)] = _TISSUES.index("necrotic")


def _pick(where, depth, rng):
    """A random voxel index of ``where``; the deepest brain voxel if ``where`` is empty."""
    flat = np.flatnonzero(where)
    index = flat[rng.integers(flat.size)] if flat.size else np.argmax(depth)
    return np.unravel_index(index, depth.shape)


def _distance(axes, point):
    return np.sqrt(sum((x - p) ** 2 for x, p in zip(axes, point)))


def _labels(tissue, scheme):
    seg = np.zeros(tissue.shape, np.uint8)
    core = (_TISSUES.index("necrotic"), _TISSUES.index("nonenhancing"))
    seg[np.isin(tissue, core)] = scheme.necrotic
    seg[tissue == _TISSUES.index("edema")] = scheme.edema
    seg[tissue == _TISSUES.index("enhancing")] = scheme.enhancing
    return seg


def _smooth_noise(shape, rng):
    """Zero-mean, unit-range smooth random field."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=max(shape) / 8)
    return field / (np.abs(field).max() + 1e-8)


def _unit_noise(shape, sigma, rng):
    """Zero-mean, unit-std smooth random field with correlation length ``sigma`` voxels."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=sigma)
    return field / (field.std() + 1e-8)


def _smooth_field(shape, rng, amplitude):
    return np.exp(amplitude * _smooth_noise(shape, rng)).astype(np.float32)


def _save(array, affine, path):
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
