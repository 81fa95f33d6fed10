"""Run a study: for each size and seed, ``lmstrain fit`` then ``lmstrain evaluate`` in
subprocesses; resumable.

Every size trains the configured model with ``data.resize: resample`` on the same split
(``data.split_seed``, which defaults to ``train.seed``) for the same epochs with the same
optimiser; only ``data.shape`` changes, and with ``--repeats N`` the training seed
(``train.seed``, ``train.seed + 1``, ...). Before a size's first run the memory simulator's
prediction (the one ``lmstrain fit`` checks and ``lmstrain plan`` reports) decides whether
it swaps to fit the budget; the run is then started with swapping on or off, since the two
need different device set-ups before TensorFlow starts. The study folder holds::

    study.json   options, the config, per size its swap decision and why, its runs, results,
                 its label round trip and the paired comparisons (written after every run)
    study.csv    one row per size;  cases.csv: one row per run and validation case
    dice.png, epoch_time.png
    config.yaml  the resolved config every run starts from
    runs/        the run directories, size032-seed0-<timestamp>/ ...
    logs/        each run's fit and evaluate output, size032-seed0.log

A size's label round trip is the Dice of each validation case's own segmentation taken to
the size's grid and back (:func:`~lmstrain.evaluation.scoring.label_round_trip`): what a
network reproducing its thresholded training labels exactly would score (soft predictions
can score more), computed once the size has a split.

A run counts as finished when it trained every epoch and its evaluation is written; a
resumed study skips those, continues a run from its last finished epoch, and starts again a
run that had not finished one. A run that fails is recorded and the study goes on.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from tqdm import tqdm

from lmstrain import locking
from lmstrain.atomic import write_text
from lmstrain.config import Config, config_from_dict, divisor, require_data_root, save_config, \
    split_seed
from lmstrain.data.brats import discover_cases
from lmstrain.data.preprocess import Settings
from lmstrain.data.split import load_split
from lmstrain.errors import LmstrainError, UserError
from lmstrain.evaluation.scoring import label_round_trip
from lmstrain.lms.errors import LMSError
from lmstrain.planning.sizing import MAX_EDGE, voxels
from lmstrain.planning.sweep import scaled_shapes
from lmstrain.study import analysis
from lmstrain.training.launcher import exit_with_parent
from lmstrain.training.rundir import check_output_root, writing

log = logging.getLogger("lmstrain.study")

RUNS, LOGS = "runs", "logs"


@dataclass
class StudyOptions:
    """What the command line chose; recorded in ``study.json`` (``--resume`` must match)."""

    sizes: list[int]  # largest edges, as asked
    device_memory: int | None = None  # bytes; None = lms.device_memory, else the GPU's
    repeats: int = 1
    measure_memory: bool = False


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study."""

    size: int  # the shape's largest edge
    shape: tuple[int, ...]
    seed: int  # train.seed

    @property
    def name(self) -> str:
        return f"size{self.size:03d}-seed{self.seed}"


class Study:
    """A study folder: its runs, their swap decisions, and the results."""

    def __init__(self, config: Config, options: StudyOptions, out_dir, resume: bool = False):
        self.config, self.options, self.out_dir = config, options, Path(out_dir)
        _check_config(config)
        require_data_root(config)
        step = divisor(config.model.depth)
        self.shapes = _shapes(config, options.sizes, step)
        self.specs = [RunSpec(size, shape, config.train.seed + r)
                      for size, shape in self.shapes for r in range(options.repeats)]
        self.record_path = self.out_dir / "study.json"
        if self.record_path.exists() and not resume:
            raise UserError(f"{self.out_dir} already holds a study; pass --resume to continue "
                            "it or choose another --out")
        if resume and self.record_path.exists():
            self._check_same_study(json.loads(self.record_path.read_text()))
        else:  # a new study (--resume with nothing to resume starts one, as maxres does)
            check_output_root(self.out_dir)
        self.decisions: dict[int, dict] = {}
        self.round_trips: dict[int, dict] = {}  # size -> case id -> Dice per region
        self.runs: dict[RunSpec, dict] = {}

    def run(self, on_run=None) -> dict:
        """Train and score every run not finished yet; return the study's record.

        ``on_run(spec, record)`` is called before each run with ``record`` None and after it
        with its record (a progress bar, say).
        """
        with writing(self.out_dir):
            (self.out_dir / RUNS).mkdir(parents=True, exist_ok=True)
            (self.out_dir / LOGS).mkdir(exist_ok=True)
        with locking.exclusive(self.out_dir, "study"):
            if self.record_path.exists():
                saved = json.loads(self.record_path.read_text())
                self.decisions = {s["size"]: s["decision"] for s in saved["sizes"]
                                  if s.get("decision")}
                self.round_trips = {s["size"]: s["label_round_trip"]["cases"]
                                    for s in saved["sizes"] if s.get("label_round_trip")}
            with writing(self.out_dir / "config.yaml"):
                save_config(self.config, self.out_dir / "config.yaml")
            for spec in self.specs:
                if spec.size not in self.decisions:
                    self.decisions[spec.size] = self.decide(spec)
                    self._write()
                if on_run:
                    on_run(spec, None)
                swapping = self.decisions[spec.size]["swapping"]
                self.runs[spec] = (self._run(spec, swapping) if swapping is not None else
                                   _failed(spec, "planning", self.decisions[spec.size]["why"]))
                if spec.size not in self.round_trips and \
                        self.runs[spec]["status"] == "finished":
                    self.round_trips[spec.size] = self._round_trip(
                        spec, Path(self.runs[spec]["run_dir"]))
                self._write()
                if on_run:
                    on_run(spec, self.runs[spec])
            return self._write(final=True)

    def overrides(self, spec: RunSpec, swapping: bool | str) -> list[str]:
        """The ``--set`` overrides that make the study's config into ``spec``'s run."""
        sets = [f"data.shape=[{','.join(map(str, spec.shape))}]", "data.resize=resample",
                f"data.split_seed={split_seed(self.config)}", f"train.seed={spec.seed}",
                f"output.root={self.out_dir / RUNS}", f"output.name={spec.name}",
                f"lms.enabled={str(swapping).lower()}"]
        if self.options.device_memory:
            sets += [f"lms.device_memory={self.options.device_memory}", "lms.autotune=true"]
        return sets

    def decide(self, spec: RunSpec) -> dict:
        """Swap or not at ``spec``'s size: the simulator's predicted peak against the budget
        (``lms.enabled: auto`` as ``lmstrain fit`` decides it)."""
        from lmstrain.training import memcheck  # starts TensorFlow: only when a size needs it

        try:
            check = memcheck.check(config_from_dict(self.config.to_dict(),
                                                    self.overrides(spec, "auto")))
        except (LmstrainError, LMSError) as err:  # no swap plan fits the budget
            return {"swapping": None, "why": f"does not fit even with swapping: {err}"}
        predicted = check.with_swap if check.swap else check.without_swap
        return {"swapping": check.swap, "why": check.decision, "budget_bytes": check.budget,
                "predicted_peak_bytes": predicted.peak_bytes if predicted else None,
                "predicted_peak_bytes_without_swap":
                    check.without_swap.peak_bytes if check.without_swap else None,
                "predicted": memcheck.PREDICTED.format(executor=predicted.executor)
                if predicted else None}

    def _round_trip(self, spec: RunSpec, run_dir: Path) -> dict:
        """The label round trip of each validation case of ``run_dir``'s split at ``spec``'s
        size (the split is the same for every run of the study)."""
        config = config_from_dict(self.config.to_dict(), self.overrides(spec, False))
        cases = discover_cases(require_data_root(config), config.data.layout)
        _train, validation = load_split(run_dir / "split.json", cases)
        settings = Settings.from_config(config)
        cases = tqdm(validation, desc=f"Label round trip at {spec.size}", unit="case",
                     leave=False, disable=None)
        return {case.case_id: label_round_trip(case, settings) for case in cases}

    def _run(self, spec: RunSpec, swapping: bool) -> dict:
        """Train (or continue) and evaluate ``spec``'s run; return its record."""
        log_path = self.out_dir / LOGS / f"{spec.name}.log"
        run_dir = self._run_dir(spec)
        config_path = str(self.out_dir / "config.yaml")
        memory = ["--measure-memory"] if self.options.measure_memory else []
        if run_dir is None or analysis.epochs_done(run_dir) < self.config.train.epochs:
            if run_dir is None:
                args = ["fit", config_path, *_sets(self.overrides(spec, swapping)), *memory]
            else:
                args = ["fit", config_path, "--resume", str(run_dir), *memory]
            error = _lmstrain(args, log_path)
            run_dir = self._run_dir(spec, keep_unfinished=True)
            if error:
                return _failed(spec, "training", error, run_dir, log_path)
        evaluation = run_dir / "evaluation"
        if not (evaluation / "summary.json").exists():
            error = _lmstrain(["evaluate", str(run_dir), "--save-predictions"], log_path)
            if error:
                return _failed(spec, "evaluation", error, run_dir, log_path)
        return {"name": spec.name, "seed": spec.seed, "status": "finished",
                "log": str(log_path), **analysis.run_result(run_dir)}

    def _run_dir(self, spec: RunSpec, keep_unfinished: bool = False) -> Path | None:
        """``spec``'s run directory with a finished epoch, the newest if several. Folders of
        the run without one (a fit stopped before its first epoch ended) hold nothing to
        keep and are removed, unless ``keep_unfinished`` (then the newest is returned)."""
        found = sorted(p for p in (self.out_dir / RUNS).glob(f"{spec.name}-*") if p.is_dir())
        committed = [p for p in found if (p / "checkpoints" / "state.json").exists()]
        if keep_unfinished:
            return (committed or found or [None])[-1]
        for leftover in set(found) - set(committed):
            shutil.rmtree(leftover)
        return committed[-1] if committed else None

    def _check_same_study(self, saved: dict) -> None:
        for key, value in asdict(self.options).items():
            if saved["options"].get(key) != value:
                raise UserError(f"--resume: {self.out_dir} was started with {key} "
                                f"{saved['options'].get(key)!r}, not {value!r}; pass the same "
                                "options or choose another --out")
        config = json.loads(json.dumps(self.config.to_dict()))
        for section, values in saved["config"].items():
            for key, value in values.items():
                if config[section][key] != value:
                    raise UserError(f"--resume: {self.out_dir} was started with {section}.{key} "
                                    f"{value!r}, not {config[section][key]!r}; pass the same "
                                    "config or choose another --out")

    def _write(self, final: bool = False) -> dict:
        """Write ``study.json`` (and with ``final`` the CSV files and plots); return it."""
        sizes = []
        for size, shape in self.shapes:
            runs = [self.runs[s] for s in self.specs if s.size == size and s in self.runs]
            sizes.append({"size": size, "shape": list(shape), "voxels": voxels(shape),
                          "decision": self.decisions.get(size), "runs": runs,
                          **analysis.size_result(runs), "label_round_trip":
                              analysis.round_trip_result(self.round_trips.get(size))})
        record = {"config": self.config.to_dict(), "options": asdict(self.options),
                  "complete": all(self.runs.get(s, {}).get("status") == "finished"
                                  for s in self.specs),
                  "sizes": sizes, "comparisons": analysis.comparisons(sizes)}
        with writing(self.record_path):
            write_text(self.record_path, json.dumps(record, indent=2) + "\n")
        if final:
            analysis.write_tables(record, self.out_dir)
        return record


def default_out_dir(config: Config) -> Path:
    """``<output.root>/study-<output.name>-<timestamp>``."""
    return Path(config.output.root) / f"study-{config.output.name or 'run'}-" \
        f"{datetime.now():%Y%m%d-%H%M%S}"


def _check_config(config: Config) -> None:
    """Refuse what would not compare resolutions, before a study folder exists."""
    if config.data.resize != "resample":
        raise UserError("a study compares resolutions, but data.resize is crop_pad: each size "
                        "would see another field of view at the same resolution. Set "
                        "data.resize: resample (--set data.resize=resample)")
    if config.train.distribute == "multi_worker":
        raise UserError("a study trains each run in one process; train.distribute: "
                        "multi_worker is not supported here (use none or mirrored)")


def _shapes(config: Config, sizes: list[int], step: int) -> list[tuple[int, tuple]]:
    """``(largest edge, shape)`` per distinct size, ascending; at least two."""
    if max(sizes) > MAX_EDGE:
        raise UserError(f"--sizes goes up to {max(sizes)}; lmstrain trains largest edges up to "
                        f"{MAX_EDGE}")
    small = [s for s in sizes if s < step]
    if small:
        raise UserError(f"--sizes {small[0]} is below {step}, the network's divisor "
                        "(2^(model.depth-1)); sizes are rounded down to a multiple of it")
    shapes = scaled_shapes(config.data.shape, sizes, step)
    if len(shapes) < 2:
        raise UserError(f"--sizes {','.join(map(str, sizes))} give {len(shapes)} distinct "
                        f"shape; a study compares at least two (sizes are rounded down to a "
                        f"multiple of {step})")
    return shapes


def _sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def _lmstrain(args: list[str], log_path: Path) -> str | None:
    """Run ``lmstrain ARGS`` in a subprocess, its output appended to ``log_path``; return
    None when it succeeds, else its error (its ``Error:`` line, or its exit status)."""
    start = log_path.stat().st_size if log_path.exists() else 0
    with writing(log_path), log_path.open("ab") as out:
        out.write(f"$ lmstrain {' '.join(args)}\n".encode())
        out.flush()
        code = subprocess.run([sys.executable, "-m", "lmstrain.cli", *args],
                              stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                              preexec_fn=exit_with_parent).returncode
    if code == 0:
        return None
    with log_path.open("rb") as handle:
        handle.seek(start)
        lines = handle.read().decode(errors="replace").splitlines()
    errors = [line[len("Error: "):] for line in lines if line.startswith("Error: ")]
    status = f"exit status {128 - code if code < 0 else code}"
    return f"{errors[-1]} ({status})" if errors else status


def _failed(spec, stage, error, run_dir=None, log_path=None):
    log.warning("%s failed in %s: %s%s", spec.name, stage, error,
                f" (log: {log_path})" if log_path else "")
    return {"name": spec.name, "seed": spec.seed, "status": "failed", "stage": stage,
            "error": error, "run_dir": str(run_dir) if run_dir else None,
            "log": str(log_path) if log_path else None}
