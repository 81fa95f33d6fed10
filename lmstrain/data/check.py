"""``lmstrain data check``: load every case and report shapes, spacings, labels and problems."""

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmstrain.data.brats import unmatched_files
from lmstrain.data.preprocess import load_case
from lmstrain.errors import DataError


@dataclass
class CheckReport:
    n_cases: int
    shapes: Counter = field(default_factory=Counter)
    spacings: Counter = field(default_factory=Counter)
    dtypes: Counter = field(default_factory=Counter)
    labels: set = field(default_factory=set)
    warnings: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    ignored: list = field(default_factory=list)   # files matching no case, relative to the root
    layout: str = ""

    def lines(self):
        """The report as text lines."""
        out = [f"{self.n_cases} cases ({self.n_cases - len(self.failures)} load)"]
        out.append("shapes:   " + _counts(self.shapes))
        out.append("spacings: " + _counts(self.spacings, "{} mm"))
        out.append("dtypes:   " + _counts(self.dtypes))
        out.append("labels:   " + ", ".join(map(str, sorted(self.labels))))
        out += [f"ignored:  {p} (matches no case of the {self.layout} layout)"
                for p in self.ignored]
        out += [f"warning: {w}" for w in self.warnings]
        out += [f"problem: {f}" for f in self.failures]
        return out


def check_cases(cases, root: Path) -> CheckReport:
    """Load each case of ``root`` as training would; collect what it looks like, what is
    wrong, and the NIfTI files that belong to no case."""
    report = CheckReport(len(cases), layout=cases[0].layout.name)
    report.ignored = [p.relative_to(root) for p in unmatched_files(root, cases)]
    for case in tqdm(cases, desc="Checking", unit="case", disable=None):
        try:
            loaded = load_case(case, with_seg=case.seg is not None)
        except DataError as err:
            report.failures.append(str(err))
            continue
        report.shapes[tuple(loaded.image.shape[:3])] += 1
        report.spacings[tuple(round(s, 3) for s in loaded.spacing)] += 1
        report.dtypes[loaded.dtype] += 1
        if loaded.seg is None:
            report.warnings.append(f"case {case.case_id}: no segmentation (fine for predict, "
                                   "not for training)")
        else:
            report.labels.update(np.unique(loaded.seg).tolist())
            if not (loaded.seg > 0).any():
                report.warnings.append(f"case {case.case_id}: segmentation is empty")
        if max(loaded.spacing) / min(loaded.spacing) > 1.5:
            report.warnings.append(f"case {case.case_id}: anisotropic voxels {loaded.spacing} mm")
    return report


def _counts(counter, fmt="{}"):
    def show(key):
        return fmt.format("x".join(map(str, key)) if isinstance(key, tuple) else key)
    return ", ".join(f"{show(k)} ({n})" for k, n in counter.most_common(5)) + (
        " ..." if len(counter) > 5 else "")
