"""BraTS releases: file naming, case discovery and label schemes.

Every case is read into the channel order t1, t1ce, t2, flair (2023+: t1n, t1c, t2w, t2f) and
its labels are mapped to three overlapping regions: whole tumour (WT), tumour core (TC) and
enhancing tumour (ET).
"""

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmstrain.errors import DataError

REGIONS = ("wt", "tc", "et")


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


@dataclass(frozen=True)
class Layout:
    """How one release names its files: ``<case><sep><modality>.nii[.gz]`` in a case folder."""

    name: str
    case_pattern: str          # regular expression a case id matches
    separator: str
    modalities: tuple          # file suffixes in the project's channel order (t1, t1ce, t2, flair)
    seg_suffix: str
    labels: LabelScheme


BRATS_2017_LABELS = LabelScheme(necrotic=1, edema=2, enhancing=4)
BRATS_2023_LABELS = LabelScheme(necrotic=1, edema=2, enhancing=3)

LAYOUTS = {
    "brats2021": Layout("brats2021", r"BraTS2021_\d+", "_", ("t1", "t1ce", "t2", "flair"),
                        "seg", BRATS_2017_LABELS),
    "brats2023": Layout("brats2023", r"BraTS-[A-Z]+-\d+-\d+", "-", ("t1n", "t1c", "t2w", "t2f"),
                        "seg", BRATS_2023_LABELS),
}


@dataclass(frozen=True)
class Case:
    """One subject: its id, its four image files in channel order and its segmentation file."""

    case_id: str
    images: tuple
    seg: Path
    layout: Layout


def discover_cases(root, layout="auto"):
    """Find every complete case under ``root`` (searched recursively), sorted by id.

    ``layout`` is a key of :data:`LAYOUTS` or ``"auto"`` (the layout that finds the most cases).
    Raises :class:`DataError` listing what was found when no layout matches.
    """
    root = Path(root)
    files = sorted(p for p in root.rglob("*.nii*") if p.name.endswith((".nii", ".nii.gz")))
    if layout == "auto":
        found = {name: _cases_for_layout(files, lay) for name, lay in LAYOUTS.items()}
        best = max(found, key=lambda name: len(found[name]))
        cases = found[best]
    elif layout in LAYOUTS:
        cases = _cases_for_layout(files, LAYOUTS[layout])
    else:
        raise DataError(f"data.layout {layout!r} is not supported yet; use one of: auto, "
                        + ", ".join(LAYOUTS))
    if not cases:
        sample = ", ".join(str(p.relative_to(root)) for p in files[:5]) or "no NIfTI files"
        expected = "; ".join(
            f"{lay.name}: <case>/<case>{lay.separator}{{{','.join(lay.modalities)},seg}}.nii.gz"
            for lay in LAYOUTS.values())
        raise DataError(f"no BraTS cases found under {root} (layout {layout}). Found: {sample}"
                        f"{' ...' if len(files) > 5 else ''}. Expected {expected}")
    return cases


def _cases_for_layout(files, layout):
    suffixes = layout.modalities + (layout.seg_suffix,)
    pattern = re.compile(rf"({layout.case_pattern}){re.escape(layout.separator)}"
                         rf"({'|'.join(suffixes)})\.nii(\.gz)?")
    by_case = {}
    for path in files:
        match = pattern.fullmatch(path.name)
        if match:
            by_case.setdefault(match.group(1), {})[match.group(2)] = path
    cases = []
    for case_id, parts in sorted(by_case.items()):
        if all(s in parts for s in suffixes):
            cases.append(Case(case_id, tuple(parts[m] for m in layout.modalities),
                              parts[layout.seg_suffix], layout))
    return cases
