"""``lmstrain maxres``: the largest trainable image size (or batch) per memory budget.

For each device-memory budget, batch size and swap setting the search walks a list of
candidate shapes, starting where the simulator predicts the limit, and runs real training
trials (each in its own subprocess, see :mod:`lmstrain.planning.harness`) until it has found
the largest shape that trains *and* has seen the next larger one fail. Every trial is stored as a JSON file
under ``<out>/trials/``, so an interrupted sweep resumes without redoing finished trials.

The sweep folder: ``sweep.json`` (the config and options the trials were made with: ``--resume``
refuses a config or options that would change a trial's outcome), ``trials/``, ``results.json``,
``results.csv``, plots, ``.lock`` (held by the running sweep, its pid inside: one sweep per
folder) and, while a trial runs, ``.trial/`` (its request and result files). A trial dies with
its sweep (see :mod:`lmstrain.planning.harness`); what a killed sweep left is removed when the
folder is swept again.
"""

import csv
import json
import shutil
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from math import prod
from pathlib import Path

from lmstrain import locking
from lmstrain.atomic import atomic_path, write_text
from lmstrain.config import Config, config_from_dict
from lmstrain.errors import UserError
from lmstrain.lms.settings import SwapSettings
from lmstrain.model.unet3d import divisor
from lmstrain.planning import harness
from lmstrain.planning.simulate import default_budget, default_executor
from lmstrain.planning.sizing import (LIMITS, MAX_EDGE, SIZE_RANGE, check_size,
                                      default_host_memory, scaled_shape)
from lmstrain.planning.transfer import transfer_model
from lmstrain.report import plot_maxres, plot_step_times

STATUSES = ("ok", "oom", "crash", "timeout")
RECORD, SCRATCH = "sweep.json", ".trial"
OUTPUTS = (RECORD, "results.json", "results.csv", "max_voxels.png", "step_time.png")
# What a trial's outcome depends on besides its spec: these config sections and options.
RESULT_SECTIONS = ("model", "loss", "train", "lms")
RESULT_OPTIONS = {"mode": "--mode", "executor": "--executor", "host_memory": "--host-memory"}


@dataclass(frozen=True)
class TrialSpec:
    """One training trial: a shape, a batch size, swapping on or off, a memory budget."""

    shape: tuple
    batch: int
    lms: bool
    device_memory_bytes: int

    @property
    def size(self):
        return max(self.shape)

    @property
    def key(self):
        """A file-name-safe identifier."""
        return (f"mem{self.device_memory_bytes}-b{self.batch}-{'lms' if self.lms else 'nolms'}-"
                + "x".join(map(str, self.shape)))


@dataclass
class Trial:
    """A finished trial: its spec, what happened and what was measured."""

    shape: list
    size: int
    batch: int
    lms: bool
    device_memory_bytes: int
    status: str
    reason: str = ""
    measured_peak_bytes: int = None
    step_time_s: float = None
    predicted_peak_bytes: int = None
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ok(self):
        return self.status == "ok"

    def to_dict(self):
        return asdict(self)


def scaled_shapes(base_shape, sizes, divisor):
    """Shapes with the aspect of ``base_shape`` whose largest edge is each of ``sizes``.

    Each axis is rounded down to a multiple of ``divisor`` (at least ``divisor``); sizes that
    round to the same shape appear once, and shapes whose largest edge rounded out of
    ``min(sizes)..max(sizes)`` not at all. Returns ``[(largest_edge, shape), ...]`` ascending.
    """
    shapes = {scaled_shape(base_shape, size, divisor) for size in sizes}
    return sorted(((max(shape), shape) for shape in shapes
                   if min(sizes) <= max(shape) <= max(sizes)), key=lambda x: (x[0], x[1]))


def search_largest(candidates, run, start=0):
    """Find the largest candidate ``run`` accepts, starting the walk at index ``start``.

    ``candidates`` are ordered from smallest to largest and ``run(candidate)`` returns a
    :class:`Trial`. Trials are assumed monotonic (if a candidate fails, larger ones fail).
    The search always runs the candidate one step above the largest one that passed, when
    there is one, so every reported maximum is confirmed by a failure.
    Returns ``(index of the largest passing candidate or None, trials run in order)``.
    """
    if not candidates:
        return None, []
    trials = []

    def attempt(index):
        trial = run(candidates[index])
        trials.append(trial)
        return trial.ok

    index = min(max(start, 0), len(candidates) - 1)
    if attempt(index):
        while index + 1 < len(candidates) and attempt(index + 1):
            index += 1
        return index, trials
    while index > 0:
        index -= 1
        if attempt(index):
            return index, trials
    return None, trials


# --- running a sweep ------------------------------------------------------------------------

@dataclass
class SweepOptions:
    """What ``lmstrain maxres`` sweeps; see its ``--help``."""

    sizes: list[int]
    batch_sizes: list[int]
    lms: list[bool]
    budgets: list[int]
    mode: str = "measure"
    fixed_size: int | None = None
    timeout_s: float = 900.0
    host_memory: int | None = None  # for swapped tensors; None = not a limit (only reported)
    executor: str | None = None
    swap: dict = field(default_factory=dict)  # SwapSettings fields of the swap-on trials

    @classmethod
    def from_config(cls, config: Config, sizes: list[int] | None = None,
                    batch_sizes: list[int] | None = None, lms: str = "both",
                    budgets: list[int] | None = None, mode: str = "measure",
                    fixed_size: int | None = None, timeout_s: float = 900.0,
                    host_memory: int | None = None, executor: str | None = None,
                    ) -> "SweepOptions":
        """Options with the defaults that come from ``config``: sizes from half to four times
        the configured size in steps of the divisor, ``train.batch_size``,
        the default budget (``lms.device_memory``, else the GPU's memory)."""
        step = divisor(config.model.depth)
        if sizes is None:
            largest = max(config.data.shape)
            sizes = list(range(max(step, largest // 2 // step * step), 4 * largest + 1, step))
        _check_sizes(config, sizes, fixed_size, step)
        if not budgets:
            budget = default_budget(config)
            if budget is None:
                raise UserError("pass --device-memory (e.g. 16GiB or 256MiB,512MiB) or set "
                                "lms.device_memory in the config")
            budgets = [budget]
        executor = executor or default_executor()
        return cls(sizes=sizes, batch_sizes=batch_sizes or [config.train.batch_size],
                   lms={"off": [False], "on": [True], "both": [False, True]}[lms],
                   budgets=sorted(set(budgets)), mode=mode, fixed_size=fixed_size,
                   timeout_s=timeout_s, executor=executor,
                   host_memory=host_memory or default_host_memory(executor))


def _check_sizes(config, sizes, fixed_size, step):
    """Refuse sizes beyond :data:`~lmstrain.planning.sizing.MAX_EDGE`, a fixed size below the
    network's divisor and a range that holds no size of the network (rounded into range)."""
    flag, largest = ("--fixed-size", fixed_size) if fixed_size else ("--sizes", max(sizes))
    if largest > MAX_EDGE:
        raise UserError(f"{flag} goes up to {largest}; lmstrain plans largest edges up to "
                        f"{MAX_EDGE}")
    rule = (f"{step}, the network's divisor (2^(model.depth-1)); sizes are rounded down to a "
            "multiple of it")
    if fixed_size and fixed_size < step:
        raise UserError(f"--fixed-size {fixed_size} is below {rule}")
    if not fixed_size and not scaled_shapes(config.data.shape, sizes, step):
        raise UserError(f"--sizes {min(sizes)}:{max(sizes)} holds no multiple of {rule}")


def fingerprint(config: dict, options: dict) -> dict:
    """What a trial's outcome depends on besides its spec, by dotted key or option: the
    config's model, loss, train and lms sections, and the sweep's mode, executor and host
    memory (``config`` and ``options`` as in ``results.json``)."""
    found = {f"{section}.{key}": value for section in RESULT_SECTIONS
             for key, value in config[section].items()}
    found.update({flag: options[name] for name, flag in RESULT_OPTIONS.items()})
    found["swap settings"] = options.get("swap", {})  # sweeps recorded before: the defaults
    return json.loads(json.dumps(found))  # tuples as JSON has them: lists


def default_out_dir(config):
    """``<output.root>/maxres-<output.name>-<timestamp>``."""
    return Path(config.output.root) / f"maxres-{config.output.name or 'run'}-" \
        f"{datetime.now():%Y%m%d-%H%M%S}"


def swap_gain(summary, row):
    """For a swap-on summary row: its largest voxels (largest batch with --fixed-size) over
    the same budget's and batch's row without swapping; None when there is nothing to compare.

    >>> rows = [{"lms": False, "batch": 2, "device_memory_bytes": 1, "max_voxels": 100},
    ...         {"lms": True, "batch": 2, "device_memory_bytes": 1, "max_voxels": 350}]
    >>> swap_gain(rows, rows[1]), swap_gain(rows, rows[0])
    (3.5, None)
    """
    key = "max_batch" if "max_batch" in row else "max_voxels"
    off = next((r for r in summary if not r["lms"] and r["batch"] == row["batch"]
                and r["device_memory_bytes"] == row["device_memory_bytes"]), None)
    if not row["lms"] or not off or not off.get(key) or not row.get(key):
        return None
    return row[key] / off[key]


class Sweep:
    """One sweep's output folder: trial files, results.json, results.csv and plots.

    In measure mode each trial is a real training run (:func:`run_trial_process`) with the
    swap callback's default settings; the simulator seeds the search and predicts each
    trial's peak. In simulate mode each "trial" is a simulation of the step (swap settings
    auto-tuned for the budget, as ``lmstrain plan`` does), and nothing is trained.
    """

    def __init__(self, config, options, out_dir, resume=False):
        self.config, self.options, self.out_dir = config, options, Path(out_dir)
        self.trial_dir = self.out_dir / "trials"
        if any(not path.name.startswith(".") for path in self.trial_dir.glob("*.json")):
            if not resume:
                raise UserError(f"{self.out_dir} already holds a sweep; pass --resume to "
                                "continue it or choose another --out")
            self._check_same_settings()
        self.trial_dir.mkdir(parents=True, exist_ok=True)
        self.trials, self.summary = [], []
        self.divisor = divisor(config.model.depth)
        self._estimates = {}
        self._on_trial = None

    def run(self, on_trial=None):
        """Search every (budget, batch, lms) combination; return the results dict.

        ``on_trial(trial)`` is called after each trial (a progress bar, say).
        """
        o = self.options
        self._on_trial = on_trial
        batches = [None] if o.fixed_size else o.batch_sizes
        with locking.exclusive(self.out_dir, "sweep"):
            self._remove_leftovers()
            write_text(self.out_dir / RECORD, json.dumps(
                {"config": self.config.to_dict(), "options": asdict(o)}, indent=2) + "\n")
            for budget in o.budgets:
                for batch in batches:
                    for swap in o.lms:
                        self.summary.append(self._search(budget, batch, swap))
                        self._write()
            plot_maxres(self.summary, self.out_dir / "max_voxels.png")
            if any(t.step_time_s for t in self.trials):  # measured trials only
                plot_step_times([t.to_dict() for t in self.trials],
                                self.out_dir / "step_time.png")
        return self.results()

    def _check_same_settings(self):
        """Refuse to resume trials made with a config or options that change their outcome
        (:func:`fingerprint`); the settings come from ``sweep.json`` (or, from a sweep
        written before it existed, ``results.json``)."""
        record = next((path for path in (self.out_dir / RECORD, self.out_dir / "results.json")
                       if path.exists()), None)
        if record is None:
            raise UserError(f"{self.out_dir}: cannot tell which config made its trials (no "
                            f"{RECORD}); choose another --out")
        recorded = json.loads(record.read_text())
        # Keys added to the schema since the sweep was recorded take their defaults, the
        # settings its trials ran with.
        before = fingerprint(config_from_dict(recorded["config"]).to_dict(),
                             recorded["options"])
        now = fingerprint(self.config.to_dict(), asdict(self.options))
        changed = [f"{key} {before.get(key)} -> {now.get(key)}"
                   for key in sorted(before.keys() | now.keys()) if before.get(key) != now.get(key)]
        if changed:
            raise UserError(f"{self.out_dir} holds trials made with other settings "
                            f"({'; '.join(changed)}); --resume needs the same config and "
                            "--mode, --executor and --host-memory, or choose another --out")

    def _remove_leftovers(self):
        """Remove what a killed sweep left: its trial's request and result files and
        half-written files (hidden temporary names beside the sweep's own files)."""
        shutil.rmtree(self.out_dir / SCRATCH, ignore_errors=True)
        for path in [*self.trial_dir.glob(".*.json"),
                     *(p for name in OUTPUTS for p in self.out_dir.glob(f".{name}.*"))]:
            path.unlink(missing_ok=True)

    def _search(self, budget, batch, swap):
        o = self.options
        if o.fixed_size:
            shape = scaled_shape(self.config.data.shape, o.fixed_size, self.divisor)
            specs = [TrialSpec(shape, b, swap, budget) for b in o.batch_sizes]
        else:
            specs = [TrialSpec(shape, batch, swap, budget)
                     for _edge, shape in scaled_shapes(self.config.data.shape, o.sizes,
                                                       self.divisor)]
        best, trials = search_largest(specs, self.trial, self._seed(specs))
        self.trials.extend(t for t in trials if t not in self.trials)
        row = {"device_memory_bytes": budget, "batch": batch, "lms": swap,
               "max_size": None, "max_shape": None, "max_voxels": None,
               "limited_by": self._limited_by(specs, best, trials)}
        if best is not None:
            spec = specs[best]
            row.update(max_size=spec.size, max_shape=list(spec.shape),
                       max_voxels=int(prod(spec.shape)))
            if o.fixed_size:
                row["max_batch"] = spec.batch
            if swap:
                trial = _trial_of(trials, spec)
                row["predicted_host_bytes"] = trial.extra.get("predicted_host_bytes")
                row["transfer_model"] = self._transfer(trial)
        return row

    def _seed(self, specs):
        """Index of the candidate to try first: the largest one predicted to fit, found by
        bisecting the candidates with the simulator, so the search starts next to the limit
        and needs few trials."""
        low, high = 0, len(specs) - 1
        while low < high:
            middle = (low + high + 1) // 2
            if self._simulate(specs[middle])[0]:
                low = middle
            else:
                high = middle - 1
        return low

    def _simulate(self, spec):
        """``(fits, limited_by, estimate)`` of ``spec`` by the simulator, cached.

        Measure mode simulates what its trials run (the callback's default swap settings);
        simulate mode auto-tunes the settings for the budget, as ``lmstrain plan`` does.
        """
        if spec not in self._estimates:
            swap = (True if self.options.mode == "simulate"
                    else SwapSettings(**self.options.swap)) if spec.lms else False
            fits, limit, estimate, _settings = check_size(
                self.config, spec.shape, spec.batch, spec.device_memory_bytes, swap,
                self.options.executor, self.options.host_memory)
            self._estimates[spec] = (fits, limit, estimate)
        return self._estimates[spec]

    def trial(self, spec: TrialSpec) -> Trial:
        """The trial at ``spec``: reused from an earlier run of this sweep, or run now."""
        path = self.trial_dir / f"{spec.key}.json"
        if path.exists():
            trial = Trial(**json.loads(path.read_text()))
        else:
            trial = self._run_trial(spec)
            write_text(path, json.dumps(trial.to_dict(), indent=2) + "\n")
        if self._on_trial:
            self._on_trial(trial)
        return trial

    def _run_trial(self, spec):
        """A real trial (measure mode) or the simulator's verdict (simulate mode), with the
        simulator's predictions attached."""
        fits, limit, estimate = self._simulate(spec)
        if self.options.mode == "simulate":
            trial = Trial(shape=list(spec.shape), size=spec.size, batch=spec.batch,
                          lms=spec.lms, device_memory_bytes=spec.device_memory_bytes,
                          status="ok" if fits else "oom", reason=limit or "",
                          source=f"simulated ({self.options.executor} executor order)")
        else:
            trial = run_trial_process(self.config, spec, self.options.timeout_s,
                                      self.out_dir / SCRATCH, self.options.swap)
        if estimate is not None:
            trial.predicted_peak_bytes = int(estimate.peak_bytes)
            trial.extra.update(predicted_bound_bytes=int(estimate.bound_bytes),
                               predicted_bound_op=estimate.bound_op,
                               predicted_host_bytes=int(estimate.host_bytes),
                               predicted_limit=limit,
                               flops=estimate.flops,
                               predicted_swapped_bytes=int(estimate.swapped_bytes))
        return trial

    def _limited_by(self, specs, best, trials):
        """What stopped the search: the range, or why the first failing candidate failed."""
        if best is not None and best == len(specs) - 1:
            return SIZE_RANGE if not self.options.fixed_size else "batch range"
        failed = [t for t in trials if not t.ok]
        if not failed:
            return None
        above = failed[-1] if best is None else _trial_of(trials, specs[best + 1])
        if above.status != "oom":
            return above.status  # crash or timeout
        # A measured OOM: the simulator tells a single op or the element count apart (a
        # simulated one carries the limit as its reason).
        predicted = above.extra.get("predicted_limit") or above.reason
        return predicted if predicted in LIMITS else "device memory"

    def _transfer(self, trial):
        """The GPU transfer-time model for a swap-on trial's plan (see transfer.py)."""
        swapped = trial.extra.get("swapped_bytes") or trial.extra.get("predicted_swapped_bytes")
        flops = trial.extra.get("flops")
        return transfer_model(swapped, flops) if swapped and flops else None

    def results(self):
        return {"config": self.config.to_dict(), "options": asdict(self.options),
                "trials": [t.to_dict() for t in self.trials], "summary": self.summary}

    def _write(self):
        results = self.results()
        write_text(self.out_dir / "results.json", json.dumps(results, indent=2) + "\n")
        columns = [f.name for f in fields(Trial) if f.name != "extra"]
        with atomic_path(self.out_dir / "results.csv") as tmp, tmp.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for trial in results["trials"]:
                writer.writerow({**trial, "shape": "x".join(map(str, trial["shape"]))})


def _trial_of(trials, spec):
    """The trial in ``trials`` that ran ``spec``."""
    return next(t for t in trials if t.shape == list(spec.shape) and t.batch == spec.batch)


def run_trial_process(config: Config, spec: TrialSpec, timeout_s: float,
                      workdir: Path | None = None, swap: dict | None = None) -> Trial:
    """Run one trial through the harness (a fresh process); classify how it ended.

    Trials with swapping build each batch inside the step and are profiled (their peak is
    device-attributed); trials without keep tf.data's prefetch under a capped allocator.
    ``workdir``: where the trial's request and result files go (see
    :func:`~lmstrain.planning.harness.run_trial`); ``swap``: SwapSettings fields of a swap-on
    trial (None: the callback's defaults).
    """
    req = harness.request(config.to_dict(), spec.shape, spec.batch,
                          swap=(swap or {}) if spec.lms else None,
                          budget_bytes=spec.device_memory_bytes,
                          batches="fresh" if spec.lms else "prefetched",
                          timed_steps=2, profile=spec.lms)
    result = harness.run_trial(req, timeout_s, workdir=workdir)
    base = {"shape": list(spec.shape), "size": spec.size, "batch": spec.batch, "lms": spec.lms,
            "device_memory_bytes": spec.device_memory_bytes}
    columns = {f.name for f in fields(Trial)}
    extra = {k: result.pop(k) for k in list(result) if k not in columns}
    return Trial(**base, **result, extra=extra)
