"""On-disk cache of preprocessed volumes, keyed by the case's files and the preprocessing settings.

A cached entry is an ``.npz`` written to a temporary file and renamed into place, so several
readers (or a second run) never see a partial file, and a resolution sweep never re-reads NIfTI.
An entry that cannot be read anyway (truncated or damaged on disk) is discarded and rebuilt
from the NIfTI files, with a warning naming the case.
"""

import dataclasses
import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from lmstrain.atomic import atomic_path
from lmstrain.data.preprocess import preprocess_case

# Bump when preprocess_case changes what it produces, so stale entries are not reused.
PREPROCESS_VERSION = 2

# What reading a damaged .npz raises: zipfile (truncated, bad CRC), numpy's header parser, a
# missing array, a short read.
UNREADABLE = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)

log = logging.getLogger("lmstrain.data")


def default_cache_dir():
    """``$XDG_CACHE_HOME/lmstrain``, or ``~/.cache/lmstrain``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmstrain"


class VolumeCache:
    """Preprocessed ``(image, regions)`` arrays per case for one set of preprocessing settings."""

    def __init__(self, cache_dir, settings):
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.settings = settings

    @property
    def shape(self):
        return self.settings.shape

    def path(self, case):
        """Where ``case`` is cached; the name changes when a file or a setting changes."""
        files = []
        for p in (*case.images, case.seg):
            if p is None:  # a missing file: loading the case reports it
                continue
            stat = Path(p).stat()
            files.append([str(Path(p).resolve()), stat.st_size, stat.st_mtime_ns])
        key = {"settings": dataclasses.asdict(self.settings), "version": PREPROCESS_VERSION,
               "files": files}
        key = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]
        return self.cache_dir / f"{case.case_id}-{key}.npz"

    def has(self, case) -> bool:
        """Whether ``case`` has an entry whose arrays are all there (a cheap check: a truncated
        file has lost its zip directory; damage inside an array is found by :meth:`load`)."""
        path = self.path(case)
        try:
            with np.load(path) as entry:
                return set(entry.files) == {"image", "regions"}
        except UNREADABLE:
            return False

    def load(self, case):
        """Return ``(image, regions)`` for ``case``, preprocessing and caching it on a miss.

        An entry that cannot be read is discarded and rebuilt, with a warning naming the case.
        """
        path = self.path(case)
        if path.exists():
            try:
                return self._read(path)
            except UNREADABLE as err:
                log.warning("case %s: cache entry %s cannot be read (%s: %s); rebuilding it from "
                            "the NIfTI files", case.case_id, path.name, type(err).__name__, err)
                path.unlink(missing_ok=True)
        result = preprocess_case(case, self.settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            np.savez(tmp, image=result.image, regions=result.regions)
        return result.image, result.regions

    def _read(self, path):
        with np.load(path) as entry:
            image, regions = entry["image"], entry["regions"]
        if image.shape != (*self.shape, 4) or regions.shape != (*self.shape, 3):
            raise ValueError(f"arrays of shape {image.shape} and {regions.shape}, expected "
                             f"{(*self.shape, 4)} and {(*self.shape, 3)}")
        return image, regions
