"""Prediction with a trained run: whole volume or sliding window, back on the original grid.

In ``resample`` mode the whole brain box is resampled to the network's input, predicted in
one pass and the probabilities are resampled back. In ``crop_pad`` mode the network sees
native-resolution patches: the brain box is tiled with overlapping patches whose predictions
are blended with a Gaussian weight (centre voxels count most), as in nnU-Net.
"""

import dataclasses
import functools
import logging
import tempfile
from pathlib import Path

import keras
import nibabel as nib
import numpy as np
import yaml
from scipy import ndimage
from tqdm import tqdm

from lmstrain.atomic import atomic_path
from lmstrain.config import config_from_dict
from lmstrain.data.brats import discover_cases
from lmstrain.data.preprocess import (Settings, load_case, network_image, normalized_box,
                                      paste, restore)
from lmstrain.errors import DataError, RunError, UserError
from lmstrain.model import losses, metrics  # noqa: F401  (registers the custom objects)

log = logging.getLogger("lmstrain.evaluation.inference")


class Predictor:
    """A trained run's model and preprocessing, ready to segment cases."""

    def __init__(self, run_dir, checkpoint="best.keras", overlap=0.5):
        self.run_dir = Path(run_dir)
        config_path = self.run_dir / "config.yaml"
        path = self.run_dir / "checkpoints" / checkpoint
        if not config_path.exists() or not path.exists():
            raise UserError(f"{run_dir} is not a finished lmstrain run (expected config.yaml and "
                            f"checkpoints/{checkpoint}); pass a folder made by `lmstrain fit`")
        self.config = config_from_dict(yaml.safe_load(config_path.read_text()))
        self.settings = Settings.from_config(self.config)
        self.checkpoint = path
        self.overlap = overlap

    @functools.cached_property
    def model(self):
        """The checkpoint's model, loaded on first use (after the cheap checks)."""
        return keras.saving.load_model(self.checkpoint, compile=False)

    def predict_case(self, case):
        """Return ``(regions, loaded)``: boolean ``(X, Y, Z, 3)`` WT/TC/ET masks on the case's
        own grid (:func:`nested`, as the written label map has them), and the loaded case
        (affine, spacing, segmentation if present)."""
        probabilities, loaded = segment(case, self.settings, self._predict, self.overlap)
        return nested(probabilities >= 0.5), loaded

    def _predict(self, batch):
        return np.asarray(self.model.predict_on_batch(batch.astype(np.float32)))


def nested(regions):
    """Thresholded WT/TC/ET masks made to nest (ET within TC within WT), as in a label map:
    exactly the regions of ``from_regions(regions)``, so what is scored is what is written."""
    regions = regions.copy()
    regions[..., 1] |= regions[..., 2]
    regions[..., 0] |= regions[..., 1]
    return regions


def segment(case, settings, predict, overlap=0.5):
    """Preprocess ``case``, run ``predict`` (a batch of network inputs -> probabilities) and
    map the probabilities back to the case's grid; return ``(probabilities, loaded)``.

    The whole brain box is predicted at once when it fits the network grid (always in
    resample mode); in crop_pad mode a larger box is tiled with :func:`sliding_window`.
    """
    loaded = load_case(case, with_seg=case.seg is not None)
    box, _regions, transform = normalized_box(loaded, case, settings)
    if settings.mode == "crop_pad" and any(b > p for b, p in zip(box.shape, settings.shape)):
        return paste(sliding_window(predict, box, settings.shape, overlap), transform), loaded
    network_input = network_image(box, settings)
    return restore(predict(network_input[None])[0], transform, settings), loaded


@dataclasses.dataclass
class Predictions:
    """What :func:`predict_folder` did."""

    n_cases: int
    written: dict            # case id -> its segmentation file, in case order
    skipped: list            # ids of the cases left out (data.on_error: skip)


def predict_folder(run_dir, input_dir, output_dir, overwrite=False,
                   on_error=None) -> Predictions:
    """Segment every case in ``input_dir``; write ``<case_id>.nii.gz`` label maps to
    ``output_dir`` with the input's shape, affine and the release's label values.

    A case that cannot be read stops everything before anything is written (``on_error``
    ``"fail"``) or is left out with a warning (``"skip"``); the default is the run's
    ``data.on_error``. ``output_dir`` must be writable before the model is loaded.
    """
    predictor = Predictor(run_dir)
    on_error = on_error or predictor.config.data.on_error
    # Prediction needs the images only: a segmentation in the input folder is not read.
    cases = [dataclasses.replace(case, seg=None) for case in discover_cases(input_dir)]
    output_dir = Path(output_dir)
    targets = {case.case_id: output_dir / f"{case.case_id}.nii.gz" for case in cases}
    existing = [p.name for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{output_dir} already holds {len(existing)} of these segmentations "
                        f"(e.g. {existing[0]}); choose another folder or pass --overwrite")
    if on_error == "fail":
        for case in tqdm(cases, desc="Checking", unit="case", disable=None):
            try:
                load_case(case, with_seg=False)
            except DataError as err:
                raise DataError(f"{err}; nothing written (data.on_error: fail; pass "
                                "--on-error skip to leave such cases out)") from None
    require_writable(output_dir)
    done = Predictions(len(cases), {}, [])
    for case in tqdm(cases, desc="Predicting", unit="case", disable=None):
        target = targets[case.case_id]
        try:
            regions, loaded = predictor.predict_case(case)
        except DataError as err:
            if on_error == "fail":
                raise DataError(f"{err}; {_written(done)}") from None
            log.warning("skipping %s", err)
            done.skipped.append(case.case_id)
            continue
        try:
            write_segmentation(case.layout.labels.from_regions(regions), loaded.affine, target)
        except OSError as err:
            raise RunError(f"cannot write {target}: {err.strerror or err}; {_written(done)}") \
                from None
        done.written[case.case_id] = target
    return done


def require_writable(folder: Path):
    """Create ``folder`` if needed and check a file can be written in it (UserError if not)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"cannot write to {folder}: {err.strerror or err}; choose a writable "
                        "output folder") from None


def _written(done):
    if not done.written:
        return "nothing written"
    return f"already written: {', '.join(done.written)}"


def write_segmentation(labels, affine, path):
    """Write a uint8 label map as NIfTI with the input's ``affine``, atomically."""
    image = nib.Nifti1Image(labels.astype(np.uint8), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)


def sliding_window(predict, volume, patch, overlap=0.5):
    """Predict ``volume`` ``(X, Y, Z, C)`` patch by patch; return ``(X, Y, Z, out)``.

    Patches overlap by ``overlap`` of their size; each is weighted by a Gaussian centred on
    the patch (sigma = patch / 8), and overlapping predictions are averaged with those weights.
    """
    patch = tuple(int(p) for p in patch)
    padded_shape = tuple(max(s, p) for s, p in zip(volume.shape[:3], patch))
    padded = np.zeros(padded_shape + volume.shape[3:], volume.dtype)
    padded[tuple(slice(0, s) for s in volume.shape[:3])] = volume
    weight = gaussian_weight(patch)
    total, norm = None, np.zeros(padded_shape, np.float32)
    for corner in _corners(padded_shape, patch, overlap):
        window = tuple(slice(c, c + p) for c, p in zip(corner, patch))
        prediction = predict(padded[window][None])[0]
        if total is None:
            total = np.zeros(padded_shape + prediction.shape[3:], np.float32)
        total[window] += prediction * weight[..., None]
        norm[window] += weight
    out = total / norm[..., None]
    return out[tuple(slice(0, s) for s in volume.shape[:3])]


def gaussian_weight(patch):
    """A Gaussian bump over ``patch`` (sigma = patch / 8), 1 at the centre, never zero."""
    impulse = np.zeros(patch, np.float32)
    impulse[tuple(p // 2 for p in patch)] = 1
    weight = ndimage.gaussian_filter(impulse, [p / 8 for p in patch], mode="constant")
    weight /= weight.max()
    return np.maximum(weight, 1e-3)


def _corners(shape, patch, overlap):
    steps = []
    for size, p in zip(shape, patch):
        n = int(np.ceil((size - p) / (p * (1 - overlap)))) + 1
        steps.append(sorted({int(round(x)) for x in np.linspace(0, size - p, n)}))
    return [(x, y, z) for x in steps[0] for y in steps[1] for z in steps[2]]
