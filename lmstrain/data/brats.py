"""BraTS releases: file naming, case discovery and label schemes.

Every case is read into the channel order t1, t1ce, t2, flair (2023+: t1n, t1c, t2w, t2f;
MSD: T1w, T1gd, T2w, FLAIR) and its labels become three overlapping regions: whole tumour (WT),
tumour core (TC) and enhancing tumour (ET).
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmstrain.errors import DataError

REGIONS = ("wt", "tc", "et")
CHANNELS = ("t1", "t1ce", "t2", "flair")


@dataclass(frozen=True)
class LabelScheme:
    """Label values of one release: necrotic/non-enhancing core, oedema, enhancing tumour."""

    necrotic: int
    edema: int
    enhancing: int

    @property
    def values(self):
        return (0, self.necrotic, self.edema, self.enhancing)

    def to_regions(self, seg):
        """(X, Y, Z) label map -> (X, Y, Z, 3) uint8 WT/TC/ET masks."""
        wt = np.isin(seg, (self.necrotic, self.edema, self.enhancing))
        tc = np.isin(seg, (self.necrotic, self.enhancing))
        et = seg == self.enhancing
        return np.stack([wt, tc, et], axis=-1).astype(np.uint8)

    def from_regions(self, regions):
        """(X, Y, Z, 3) boolean WT/TC/ET masks -> label map with this release's values."""
        regions = np.asarray(regions, dtype=bool)
        seg = np.zeros(regions.shape[:-1], dtype=np.uint8)
        seg[regions[..., 0]] = self.edema
        seg[regions[..., 1]] = self.necrotic
        seg[regions[..., 2]] = self.enhancing
        return seg


BRATS_2017_LABELS = LabelScheme(necrotic=1, edema=2, enhancing=4)
BRATS_2023_LABELS = LabelScheme(necrotic=1, edema=2, enhancing=3)
MSD_LABELS = LabelScheme(necrotic=2, edema=1, enhancing=3)


@dataclass(frozen=True)
class Case:
    """One subject: its image files in channel order, its segmentation (None when absent).

    ``channels`` is set for a single 4D image (MSD): the indices of t1, t1ce, t2, flair in its
    last axis. ``missing`` names modalities that were not found; loading such a case fails.
    """

    case_id: str
    images: tuple
    seg: Path
    layout: "Layout"
    channels: tuple = None
    missing: tuple = ()


@dataclass(frozen=True)
class Layout:
    """How one release names its files: ``<case><sep><modality>.nii[.gz]`` in a case folder."""

    name: str
    case_pattern: str          # regular expression a case id matches
    separator: str
    modalities: tuple          # file suffixes in the project's channel order
    labels: LabelScheme
    description: str = field(default="", compare=False)

    def find(self, files):
        """Cases among ``files`` (every NIfTI under the data root), sorted by id."""
        suffixes = "|".join(self.modalities + ("seg",))
        pattern = re.compile(rf"({self.case_pattern}){re.escape(self.separator)}({suffixes})"
                             r"\.nii(?:\.gz)?", re.IGNORECASE)
        parts, folders = {}, {}
        for path in files:
            match = pattern.fullmatch(path.name)
            if match:
                parts.setdefault(match.group(1), {})[match.group(2).lower()] = path
                folders[match.group(1)] = path.parent
        cases = []
        for case_id, found in sorted(parts.items()):
            seg = found.get("seg") or self._odd_segmentation(folders[case_id], found, files)
            images = tuple(found.get(m) for m in self.modalities)
            missing = tuple(m for m, p in zip(self.modalities, images) if p is None)
            cases.append(Case(case_id, images, seg, self, missing=missing))
        return cases

    def _odd_segmentation(self, folder, found, files):
        """BraTS 2020 has segmentations not named after the case (e.g. ``W39_..._Segm.nii``):
        the one other NIfTI file in the case folder whose name says ``seg``."""
        known = set(found.values())
        others = [p for p in files if p.parent == folder and p not in known
                  and "seg" in p.name.lower()]
        return others[0] if len(others) == 1 else None


class MsdLayout(Layout):
    """Medical Segmentation Decathlon Task01: ``imagesTr/X.nii.gz`` (4D: FLAIR, T1w, T1gd,
    T2w) with ``labelsTr/X.nii.gz``."""

    def find(self, files):
        labels = {p.name: p for p in files if p.parent.name.startswith("labels")}
        cases = []
        for path in files:
            if path.parent.name.startswith("images") and re.fullmatch(
                    self.case_pattern, _stem(path.name)):
                cases.append(Case(_stem(path.name), (path,), labels.get(path.name), self,
                                  channels=(1, 2, 3, 0)))
        return sorted(cases, key=lambda c: c.case_id)


LAYOUTS = {
    "brats2018": Layout(
        "brats2018", r"brats1[789]_\w+?", "_", CHANNELS, BRATS_2017_LABELS,
        "2017-2019: HGG|LGG/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz"),
    "brats2020": Layout(
        "brats2020", r"brats20_[a-z]+_\d+", "_", CHANNELS, BRATS_2017_LABELS,
        "BraTS20_Training_001/BraTS20_Training_001_{t1,t1ce,t2,flair,seg}.nii"),
    "brats2021": Layout(
        "brats2021", r"brats2021_\d+", "_", CHANNELS, BRATS_2017_LABELS,
        "BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz"),
    "brats2023": Layout(
        "brats2023", r"brats-(?:gli|men|met|ped|ssa)-\d+-\d+", "-", ("t1n", "t1c", "t2w", "t2f"),
        BRATS_2023_LABELS,
        "BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz"),
    "msd": MsdLayout(
        "msd", r"[A-Za-z]+_\d+", "", CHANNELS, MSD_LABELS,
        "Task01_BrainTumour/imagesTr/BRATS_001.nii.gz + labelsTr/BRATS_001.nii.gz"),
}


def discover_cases(root, layout="auto"):
    """Find every case under ``root`` (searched recursively), sorted by id.

    ``layout`` is a key of :data:`LAYOUTS` or ``"auto"`` (the layout that finds the most cases).
    Cases missing a modality are returned with ``missing`` set, so that loading them reports
    it. Raises :class:`DataError` listing what was found when no layout matches.
    """
    root = Path(root)
    files = nifti_files(root)
    if layout == "auto":
        found = [lay.find(files) for lay in LAYOUTS.values()]
        cases = max(found, key=len)
    elif layout in LAYOUTS:
        cases = LAYOUTS[layout].find(files)
    else:
        raise DataError(f"data.layout {layout!r} is unknown; use one of: auto, {', '.join(LAYOUTS)}")
    if not cases:
        sample = ", ".join(str(p.relative_to(root)) for p in files[:5]) or "no NIfTI files"
        more = f" and {len(files) - 5} more" if len(files) > 5 else ""
        expected = "; ".join(f"{lay.name}: {lay.description}" for lay in LAYOUTS.values()
                             if layout in ("auto", lay.name))
        raise DataError(f"no BraTS cases found under {root} (data.layout: {layout}). "
                        f"Found: {sample}{more}. Expected {expected}")
    return cases


def unmatched_files(root, cases) -> list:
    """NIfTI files under ``root`` that belong to none of ``cases``: their names match no case
    of the layout (e.g. a stray copy, another release's naming), so training ignores them."""
    used = {p for case in cases for p in (*case.images, case.seg) if p is not None}
    return [p for p in nifti_files(root) if p not in used]


def nifti_files(root):
    """Every ``.nii``/``.nii.gz`` under ``root``, skipping hidden files (e.g. macOS ``._*``)."""
    return sorted(p for p in Path(root).rglob("*.nii*")
                  if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith("."))


def _stem(name):
    return name[:-len(".nii.gz")] if name.endswith(".nii.gz") else name[:-len(".nii")]
