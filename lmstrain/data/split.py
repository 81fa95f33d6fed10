"""Train/validation split by seed, saved as ``split.json`` so evaluation never scores training cases."""

import json
from pathlib import Path

import numpy as np

from lmstrain.atomic import write_text
from lmstrain.errors import DataError


def split_cases(cases, val_fraction, seed):
    """Shuffle ``cases`` with ``seed`` and hold out ``val_fraction`` of them (at least one)."""
    if len(cases) < 2:
        raise DataError(f"need at least 2 cases to split into training and validation, "
                        f"found {len(cases)}")
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = min(max(1, round(len(cases) * val_fraction)), len(cases) - 1)
    val = sorted(order[:n_val].tolist())
    train = sorted(order[n_val:].tolist())
    return [cases[i] for i in train], [cases[i] for i in val]


def save_split(path, train, val, seed):
    record = {"seed": seed, "train": [c.case_id for c in train],
              "validation": [c.case_id for c in val]}
    write_text(path, json.dumps(record, indent=2) + "\n")


def load_split(path, cases):
    """Return ``(train, val)`` cases named in ``split.json``; every named case must exist."""
    record = json.loads(Path(path).read_text())
    by_id = {c.case_id: c for c in cases}
    missing = [cid for cid in record["train"] + record["validation"] if cid not in by_id]
    if missing:
        raise DataError(f"{path} names cases that are not in data.root: {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}")
    return [by_id[c] for c in record["train"]], [by_id[c] for c in record["validation"]]
