"""Benchmark: how fast volumes reach the network, raw NIfTI vs the preprocessed cache.

Writes synthetic cases of BraTS size (240 x 240 x 155, .nii.gz) and measures, on this machine,
single process, wall clock:
  raw:    load four modalities + segmentation with nibabel, crop, resample to SIZE^3 with
          SimpleITK, z-score  (lmstrain.data.preprocess.preprocess_case)
  cached: read the preprocessed arrays from the .npz cache (lmstrain.data.cache.VolumeCache)
Result: bench/results/pipeline.json
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from lmstrain.atomic import write_text
from lmstrain.data.brats import discover_cases
from lmstrain.data.cache import VolumeCache
from lmstrain.data.preprocess import Settings, preprocess_case
from lmstrain.data.synth import write_dataset


def cpu_model() -> str:
    """This machine's CPU: its model name from /proc/cpuinfo, else its architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return f"{platform.machine()} CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", default="bench/results/pipeline.json")
    args = parser.parse_args()
    settings = Settings((args.size,) * 3)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"writing {args.cases} synthetic cases of 240x240x155 ...")
        write_dataset(tmp / "data", args.cases, (240, 240, 155), seed=0)
        cases = discover_cases(tmp / "data")
        start = time.perf_counter()
        for case in cases:
            preprocess_case(case, settings)
        raw_s = time.perf_counter() - start
        cache = VolumeCache(tmp / "cache", settings)
        for case in cases:
            cache.load(case)  # fill the cache (not timed)
        timings = []
        for _ in range(3):
            start = time.perf_counter()
            for case in cases:
                cache.load(case)
            timings.append(time.perf_counter() - start)
        cached_s = min(timings)
    result = {
        "size": args.size,
        "cases": args.cases,
        "raw_volumes_per_s": round(args.cases / raw_s, 3),
        "cached_volumes_per_s": round(args.cases / cached_s, 3),
        "speedup": round(raw_s / cached_s, 1),
        "measure": (f"measured: wall clock, one process, {cpu_model()} "
                    f"({platform.machine()}), synthetic 240x240x155 int16 .nii.gz "
                    f"cases; raw = nibabel load + crop + SimpleITK resample to {args.size}^3 + "
                    "z-score; cached = np.load of the preprocessed .npz (best of 3 passes, "
                    "page cache warm)"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
