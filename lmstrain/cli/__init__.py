"""The ``lmstrain`` command line: thin wrappers over the library.

Exit status: 0 on success, 2 for input errors (config, flags, data location), 1 when a run fails.
"""

import contextlib
import functools
import importlib.abc
import importlib.util
import inspect
import json
import logging
import os
import re
import sys
import tempfile

import click

from lmstrain.cli.params import BYTE_SIZES, POSITIVE_INTS, ByteSize, SizeRange
from lmstrain.errors import LmstrainError
from lmstrain.lms.errors import LMSError


class LmstrainGroup(click.Group):
    """Turns lmstrain's own errors into a one-line message and an exit status, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LmstrainError as err:
            click.secho(f"Error: {err}", err=True, fg="red")
            ctx.exit(err.exit_code)
        except LMSError as err:  # the swap engine's errors: a setting to change
            click.secho(f"Error: {err}", err=True, fg="red")
            ctx.exit(2)


def config_options(command):
    """The CONFIG argument and repeatable ``--set section.key=value`` overrides."""

    @click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
    @click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                  help="Override a config value (repeatable); the value is read as YAML, "
                       "e.g. --set train.epochs=3 --set data.shape=[64,64,64].")
    @functools.wraps(command)
    def wrapper(config_path, overrides, **kwargs):
        from lmstrain.config import load_config

        parameters = inspect.signature(command).parameters
        if "overrides" in parameters:
            kwargs["overrides"] = overrides
        if "config_path" in parameters:
            kwargs["config_path"] = config_path
        return command(config=load_config(config_path, overrides), **kwargs)

    return wrapper


@click.group(cls=LmstrainGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lmstrain")
@click.option("-v", "--verbose", is_flag=True, help="Show debug messages.")
@click.option("-q", "--quiet", is_flag=True, help="Show warnings and errors only.")
def main(verbose, quiet):
    """Train 3D U-Nets on BraTS brain-tumour MRI at sizes that do not fit in GPU memory.

    Activations are swapped to host memory during training (lms.enabled: true), in the
    spirit of IBM's TensorFlow Large Model Support, on stock TensorFlow 2 and Keras 3.

    \b
    Quick start:
      lmstrain synth demo_data --cases 24 --shape 64 64 64
      lmstrain fit configs/demo.yaml --set data.root=demo_data
      lmstrain config show configs/demo.yaml

    \b
    After training:
      lmstrain evaluate runs/demo-<timestamp>
      lmstrain predict runs/demo-<timestamp> new_cases/ predictions/

    Every command taking a CONFIG accepts --set SECTION.KEY=VALUE overrides.
    """
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger("lmstrain")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    _quiet_tensorflow(verbose)


def _quiet_tensorflow(verbose: bool) -> None:
    """Show TensorFlow's C++ warnings and errors but not its INFO lines (-v: everything),
    unless the user set TF_CPP_MIN_LOG_LEVEL or TensorFlow already runs.

    TF_CPP_MIN_LOG_LEVEL applies only once TensorFlow's libraries have loaded; the INFO lines
    they print while loading (oneDNN, "Could not find cuda drivers", once per library that
    bundles its own logging) are dropped by importing TensorFlow through
    :class:`_QuietTensorFlowImport`.
    """
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "1")
    if not verbose and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Runs the first ``import tensorflow`` with absl's INFO lines dropped from stderr."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            with _absl_info_dropped():
                load(module)
                module.config.list_physical_devices("GPU")  # CUDA's probe, while held

        spec.loader.exec_module = exec_module
        return spec


# absl's INFO line ("I0000 00:00:1796224899.578304   22776 port.cc:153] ..."), the notice it
# prints before its first line, and CUDA's "failed call to cuInit" error on a machine without
# a GPU (the expected answer of the probe, not an error of the run).
_ABSL_INFO = re.compile(rb"I\d{4} [\d:.]+ +\d+ \S+:\d+\] "
                        rb"|WARNING: All log messages before absl::InitializeLog\(\)"
                        rb"|E\d{4} [\d:.]+ +\d+ cuda_platform\.cc:\d+\] failed call to cuInit")


@contextlib.contextmanager
def _absl_info_dropped():
    """Hold what is written to file descriptor 2 meanwhile, then write it there without absl's
    INFO lines (warnings, errors and Python's output stay, in order)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            os.write(2, b"".join(line for line in held if not _ABSL_INFO.match(line)))


class _Formatter(logging.Formatter):
    def format(self, record):
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--cases", default=20, show_default=True, type=click.IntRange(1),
              help="Number of cases to write.")
@click.option("--shape", nargs=3, default=(96, 96, 96), show_default=True,
              type=click.IntRange(16), help="Volume size X Y Z in voxels (1 mm).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0),
              help="Random seed; the same seed writes the same cases.")
@click.option("--naming", default="brats2021", show_default=True,
              type=click.Choice(["brats2021", "brats2023"]),
              help="File naming and label values of this BraTS release.")
@click.option("--detail", default="standard", show_default=True,
              type=click.Choice(["standard", "fine"]),
              help="Tumour detail. fine: thin enhancing rim, small necrotic core and satellite "
                   "nodules, sizes in mm independent of --shape: structure a network at a "
                   "coarse resolution cannot resolve, for `lmstrain study`.")
def synth(out_dir, cases, shape, seed, naming, detail):
    """Write synthetic BraTS-format cases to OUT_DIR.

    Each case has four MR contrasts (t1, t1ce, t2, flair; 2023: t1n, t1c, t2w, t2f) and a
    segmentation with the release's label values, as NIfTI with a 1 mm affine: a brain-like
    phantom with grey and white matter, CSF, and a tumour (necrotic core, enhancing rim,
    oedema), with noise and a bias field. Use it to try lmstrain without BraTS.

    \b
    Examples:
      lmstrain synth demo_data --cases 24 --shape 64 64 64 --seed 0
      lmstrain synth study_data --cases 40 --shape 128 128 128 --detail fine
    """
    from tqdm import tqdm

    from lmstrain.data.synth import write_dataset

    with tqdm(total=cases, desc="Writing cases", unit="case", disable=None) as bar:
        write_dataset(out_dir, cases, shape, seed=seed, naming=naming, progress=bar.update,
                      detail=detail)
    click.echo(f"Wrote {cases} {naming} cases of {shape[0]}x{shape[1]}x{shape[2]} to {out_dir}")


@main.command()
@config_options
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False),
              help="Continue this run directory from its last finished epoch, with its own "
                   "config (only --set train.epochs=N may change it). CONFIG is ignored.")
@click.option("--measure-memory", is_flag=True,
              help="On a CPU, record the allocator's measured peak in summary.json beside the "
                   "predicted one (sets TF_CPU_ALLOCATOR_USE_BFC=true; steps take about 1.7x "
                   "as long). A GPU's peak is always recorded.")
@click.option("--workers", type=click.IntRange(1), metavar="N",
              help="Train with train.distribute: multi_worker on N local worker processes "
                   "(TF_CONFIG on free localhost ports; output prefixed [worker I]); exits "
                   "with the chief's status and stops the others when one fails.")
@click.pass_context
def fit(ctx, config, config_path, resume_dir, overrides, measure_memory, workers):
    """Train the network described by CONFIG.

    Creates a new run directory <output.root>/<output.name>-<timestamp>/ with the resolved
    config, the train/validation split, checkpoints (last.keras, best.keras by validation
    mean dice), history.csv, TensorBoard logs, progress.png and summary.json. A run is never
    overwritten; an interrupted run continues with --resume.

    With train.distribute: multi_worker, run one `lmstrain fit` per worker (TF_CONFIG, or
    one per task under Slurm's srun), or all on this machine with --workers N; only the
    chief (worker 0) writes the run directory.

    \b
    Examples:
      lmstrain fit configs/demo.yaml
      lmstrain fit configs/brats2021_isensee.yaml --set data.root=/data/BraTS2021
      lmstrain fit configs/demo.yaml --resume runs/demo-20261126-101500 --set train.epochs=40
      lmstrain fit configs/demo.yaml --workers 2
    """
    if workers:
        from lmstrain.training.launcher import launch, worker_args

        ctx.exit(launch(worker_args(ctx.parent.params, config, config_path, overrides,
                                    resume_dir, measure_memory), workers))
    if measure_memory:  # read when TensorFlow starts, so before it is imported
        os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
    from lmstrain.training.fit import fit as fit_run
    from lmstrain.training.fit import resume

    result = resume(resume_dir, overrides) if resume_dir else fit_run(config)
    _print_result(result)


def _print_result(result):
    summary = result.summary
    if result.run_dir is None:
        click.echo(f"Worker {result.worker.index} of {result.worker.workers}: trained in step "
                   "with the chief (worker 0), which wrote the run directory")
        return
    click.echo(f"Run directory: {result.run_dir}")
    best = summary.get("best_metrics") or {}
    if best:
        click.echo(
            f"Validation dice (best epoch {summary['best_epoch']} of "
            f"{summary['epochs_completed']}): WT {best['val_dice_wt']:.3f}  "
            f"TC {best['val_dice_tc']:.3f}  ET {best['val_dice_et']:.3f}  "
            f"mean {best['val_dice_mean']:.3f}")
    initial = summary.get("initial_metrics")
    if initial:
        click.echo(f"Untrained model: mean {initial['val_dice_mean']:.3f}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--data", "data_dir", type=click.Path(file_okay=False, exists=True),
              help="Score every case in this folder instead of the run's validation cases.")
@click.option("--save-predictions", is_flag=True,
              help="Also write each scored segmentation to predictions/<case_id>.nii.gz in the "
                   "results folder (the case's shape, affine and label values).")
def evaluate(run_dir, data_dir, save_predictions):
    """Score a trained run: Dice, HD95 (mm) and sensitivity per region and case.

    By default the run's validation cases (split.json) are predicted with
    checkpoints/best.keras and compared with their segmentations on the original grid, so
    training cases are never scored. Writes metrics.csv, summary.json (mean, median) and
    boxplot.png to RUN_DIR/evaluation/ (RUN_DIR/evaluation-<folder>/ with --data).

    \b
    Examples:
      lmstrain evaluate runs/demo-20261126-150945
      lmstrain evaluate runs/demo-20261126-150945 --data /data/BraTS2021_holdout
    """
    from lmstrain.evaluation.scoring import evaluate_run, format_summary

    _rows, summary, out_dir = evaluate_run(run_dir, data_dir, save_predictions)
    click.echo(format_summary(summary))
    click.echo(f"Results: {out_dir}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.argument("input_dir", type=click.Path(file_okay=False, exists=True))
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace segmentations already in OUTPUT_DIR.")
@click.option("--on-error", type=click.Choice(["fail", "skip"]),
              help="A case that cannot be read: stop before writing anything, or leave it out "
                   "with a warning (default: the run's data.on_error).")
def predict(run_dir, input_dir, output_dir, overwrite, on_error):
    """Segment every case in INPUT_DIR with a trained run; write NIfTI to OUTPUT_DIR.

    Each output <case_id>.nii.gz has the input's shape and affine and the label values of the
    input's BraTS release. Cases need their four images; a segmentation is not needed.
    Runs trained with data.resize: crop_pad predict with an overlapping sliding window.
    Prints the cases written; OUTPUT_DIR is checked writable before the model is loaded.

    \b
    Example:
      lmstrain predict runs/demo-20261126-150945 /data/new_cases predictions/
    """
    from lmstrain.evaluation.inference import predict_folder

    done = predict_folder(run_dir, input_dir, output_dir, overwrite, on_error)
    count = f"{len(done.written)} of {done.n_cases}" if done.skipped else len(done.written)
    click.echo(f"Wrote {count} segmentations to {output_dir}: {', '.join(done.written)}")
    if done.skipped:
        click.echo(f"Skipped {len(done.skipped)} (see the warnings): {', '.join(done.skipped)}")


@main.command()
@config_options
@click.option("--sizes", type=SizeRange(),
              help="Largest edges to try, inclusive (shape keeps the configured aspect, each "
                   "axis rounded down to the network's divisor). Default: half to four times "
                   "the configured size in steps of the divisor.")
@click.option("--batch-sizes", type=POSITIVE_INTS, metavar="B1,B2,...",
              help="Batch sizes (default: train.batch_size). With --fixed-size, the batch "
                   "sizes to try.")
@click.option("--lms", "lms_setting", type=click.Choice(["off", "on", "both"]), default="both",
              show_default=True, help="Sweep without swapping, with it, or both.")
@click.option("--device-memory", type=BYTE_SIZES, metavar="SIZE[,SIZE...]",
              help="Memory budget(s), e.g. 16GiB or 256MiB,512MiB (MiB, GiB, MB, GB). "
                   "Default: lms.device_memory.")
@click.option("--mode", type=click.Choice(["measure", "simulate"]), default="measure",
              show_default=True,
              help="measure: real training trials in subprocesses; simulate: the memory "
                   "simulator only.")
@click.option("--fixed-size", type=click.IntRange(1), metavar="S",
              help="Find the largest batch at this largest edge instead of the largest size.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Output folder (default: <output.root>/maxres-<name>-<timestamp>).")
@click.option("--resume", is_flag=True, help="Continue the sweep in --out, skipping finished "
                                              "trials; refused when the config or --mode, "
                                              "--executor or --host-memory changed.")
@click.option("--timeout", default=900, show_default=True, type=click.FloatRange(1),
              help="Seconds before a trial counts as timeout.")
@click.option("--host-memory", type=ByteSize(), metavar="SIZE",
              help="Host memory for swapped tensors, for the simulator (default: this "
                   "machine's RAM; with --executor gpu on a machine without a GPU, no limit: "
                   "only reported).")
@click.option("--executor", type=click.Choice(["cpu", "gpu"]),
              help="Whose execution order the simulator emulates (default: this machine's).")
@click.option("--json", "as_json", is_flag=True, help="Print only the results as JSON.")
def maxres(config, sizes, batch_sizes, lms_setting, device_memory, mode, fixed_size, out_dir,
           resume, timeout, host_memory, executor, as_json):
    """Find the largest trainable image size (or batch) per memory budget.

    For each budget, batch size and swap setting, searches the largest shape that trains at
    least two real steps on random tensors (no data needed), and confirms it by a failing
    trial one step larger. Each trial runs in a fresh subprocess with a timeout. On a GPU the
    budget is imposed by a logical device memory limit; on CPU by capping TensorFlow's
    allocator (without swapping) or by the compute device's measured share (with swapping).
    With --mode simulate nothing is trained: each trial is the memory simulator's verdict
    (swap settings auto-tuned for the budget, as in `lmstrain plan`), e.g. for GPU budgets on
    a machine without one. Swap-on results carry a transfer-time model: bytes swapped per step
    and their time over PCIe 3/4/5 and NVLink against an estimated GPU compute time (a model,
    not a measurement). Writes results.json, results.csv and plots to the output folder;
    --resume continues an interrupted sweep. Every figure is per device: with
    train.distribute: mirrored each GPU holds one replica, and the batch is the per-replica
    batch (train.batch_size).

    \b
    Examples:
      lmstrain maxres configs/demo.yaml --device-memory 256MiB --sizes 32:128:8
      lmstrain maxres configs/brats2021_isensee.yaml --mode simulate --executor gpu \\
          --device-memory 16GiB,32GiB,40GiB,80GiB --host-memory 512GiB
      lmstrain maxres configs/demo.yaml --device-memory 256MiB --fixed-size 48 \\
          --batch-sizes 1,2,4,8
    """
    from tqdm import tqdm

    from lmstrain.cli.tables import maxres_table
    from lmstrain.planning.sweep import Sweep, SweepOptions, default_out_dir

    if resume and not out_dir:
        raise click.UsageError("--resume needs --out DIR: the sweep folder to continue")
    options = SweepOptions.from_config(config, sizes=sizes, batch_sizes=batch_sizes,
                                       lms=lms_setting, budgets=device_memory, mode=mode,
                                       fixed_size=fixed_size, timeout_s=timeout,
                                       host_memory=host_memory, executor=executor)
    sweep = Sweep(config, options, out_dir or default_out_dir(config), resume)
    with tqdm(desc="Trials", unit="trial", disable=True if as_json else None) as bar:

        def on_trial(trial):
            bar.set_postfix_str(f"{'x'.join(map(str, trial.shape))} batch {trial.batch} "
                                f"swap {'on' if trial.lms else 'off'}: {trial.status}")
            bar.update()

        results = sweep.run(on_trial)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        click.echo(maxres_table(results["summary"]))
        click.echo(f"Results: {sweep.out_dir}")


@main.command()
@config_options
@click.option("--size", type=click.IntRange(1), metavar="S",
              help="Scale the configured shape so its largest edge is S (each axis rounded "
                   "down to the network's divisor). Default: data.shape.")
@click.option("--batch", type=click.IntRange(1),
              help="Batch size per device (default: train.batch_size, the per-replica batch).")
@click.option("--device-memory", type=ByteSize(), metavar="SIZE",
              help="Device memory budget, e.g. 16GiB (MiB, GiB, MB, GB). Default: "
                   "lms.device_memory, else the GPU's.")
@click.option("--host-memory", type=ByteSize(), metavar="SIZE",
              help="Host memory for swapped tensors (default: this machine's RAM; with "
                   "--executor gpu on a machine without a GPU, no limit: only reported).")
@click.option("--executor", type=click.Choice(["cpu", "gpu"]),
              help="Whose execution order to emulate (default: this machine's: gpu when "
                   "TensorFlow sees one).")
@click.option("--json", "as_json", is_flag=True, help="Print only the report as JSON.")
def plan(config, size, batch, device_memory, host_memory, executor, as_json):
    """Predict device memory for CONFIG and the largest size that fits, without training.

    Traces one training step (no data needed) and simulates its memory: weights, optimizer
    state, gradients, activations, the peak op, the peak without and with swapping (the
    settings fit would use), the physical bound (the least any swap plan can reach), the
    host memory swapped tensors need. Given a device memory budget, searches the largest
    input size without and with auto-tuned swapping and says what stops growth: device
    memory, a single op, the 2^31-1 element limit, or host memory. Every figure is per
    device: with train.distribute: mirrored each GPU holds one replica at train.batch_size.

    \b
    Examples:
      lmstrain plan configs/brats2021_isensee.yaml --device-memory 16GiB
      lmstrain plan configs/demo.yaml --size 96 --batch 1 --device-memory 1GiB --json
    """
    from tqdm import tqdm

    from lmstrain.cli.tables import plan_lines
    from lmstrain.planning.capacity import capacity

    with tqdm(desc="Simulating", unit="step", leave=False,
              disable=True if as_json else None) as bar:

        def progress(what):
            bar.set_postfix_str(what)
            bar.update()

        report = capacity(config, size, batch, device_memory, host_memory, executor, progress)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    name = click.get_current_context().params.get("config_path", "")
    for line in plan_lines(report, name):
        click.echo(line)


@main.command()
@config_options
@click.option("--sizes", type=POSITIVE_INTS, required=True, metavar="S1,S2,...",
              help="Largest edges to train at, as in `plan --size` (the configured shape "
                   "scaled to each, every axis rounded down to the network's divisor).")
@click.option("--device-memory", type=ByteSize(), metavar="SIZE",
              help="Device memory budget that decides per size whether to swap, e.g. 16GiB "
                   "(default: lms.device_memory, else the GPU's; on a CPU without one, no "
                   "swapping).")
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(1),
              help="Runs per size, with train.seed, train.seed+1, ... on the same split "
                   "(data.split_seed).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Study folder (default: <output.root>/study-<name>-<timestamp>).")
@click.option("--resume", is_flag=True,
              help="Continue the study in --out: finished runs are skipped, unfinished ones "
                   "continue from their last finished epoch, failed ones are tried again.")
@click.option("--measure-memory", is_flag=True,
              help="Pass --measure-memory to each fit: the allocator's measured peak on a CPU "
                   "(slower steps; a GPU's peak is always recorded).")
def study(config, sizes, device_memory, repeats, out_dir, resume, measure_memory):
    """Train CONFIG at several resolutions and compare their Dice on the original grid.

    For each size, trains the configured model with data.resize: resample on the same cases,
    split, epochs and optimiser (only the shape changes), each run a normal run directory
    trained by `lmstrain fit` in its own process. The memory simulator's prediction decides
    per size whether swapping is needed to fit the budget (recorded with the reason). Every
    run is then scored by `lmstrain evaluate --save-predictions` on its validation cases.
    Writes study.json, study.csv, cases.csv, dice.png and epoch_time.png to the study folder
    and prints a table; a Wilcoxon signed-rank test over the validation cases says whether
    the Dice of neighbouring sizes differ beyond noise ("too few cases" below 10). A run that
    fails is recorded and the study goes on (exit status 1 at the end).

    \b
    Examples:
      lmstrain study configs/demo.yaml --sizes 32,48,64 --device-memory 256MiB
      lmstrain study configs/brats2021_isensee.yaml --sizes 96,128,160 --repeats 3 \\
          --out studies/isensee
      lmstrain study configs/demo.yaml --sizes 32,48,64 --out studies/demo --resume
    """
    from tqdm import tqdm

    from lmstrain.cli.tables import study_table
    from lmstrain.study.runner import Study, StudyOptions, default_out_dir

    if resume and not out_dir:
        raise click.UsageError("--resume needs --out DIR: the study folder to continue")
    options = StudyOptions(sizes=sizes, device_memory=device_memory, repeats=repeats,
                           measure_memory=measure_memory)
    runner = Study(config, options, out_dir or default_out_dir(config), resume)
    with tqdm(total=len(runner.specs), desc="Runs", unit="run", disable=None) as bar:

        def on_run(spec, record):
            bar.set_postfix_str(f"{spec.name}: {record['status'] if record else 'running'}")
            if record:
                bar.update()

        record = runner.run(on_run)
    click.echo(study_table(record))
    click.echo(f"Results: {runner.out_dir}")
    if not record["complete"]:
        failed = [r["name"] for s in record["sizes"] for r in s["runs"] if r["status"] != "finished"]
        click.echo(f"{len(failed)} run(s) failed: {', '.join(failed)}; see their logs in "
                   f"{runner.out_dir / 'logs'}, then continue with --resume", err=True)
        raise SystemExit(1)


@main.group("data")
def data_group():
    """Inspect datasets before training (see `lmstrain data check --help`)."""


@data_group.command("check")
@config_options
def data_check(config):
    """Load every case of CONFIG's data.root as training would, and report.

    Prints the number of cases, their shapes, voxel spacings, data types and label values,
    and every problem (unreadable or truncated file, modality shape or affine mismatch,
    unexpected label values, missing modality, all-zero images) with the case name: what
    `fit` would reject. Lists NIfTI files whose names match no case (training ignores them).

    Exit status: 0 when every case loads (warnings allowed) or data.on_error is skip; 1 when a
    case fails under data.on_error: fail; 2 for a bad config or when no cases are found.

    \b
    Example:
      lmstrain data check configs/brats2021_isensee.yaml --set data.root=/data/BraTS2021
    """
    from lmstrain.config import require_data_root
    from lmstrain.data.brats import discover_cases
    from lmstrain.data.check import check_cases

    root = require_data_root(config)
    cases = discover_cases(root, config.data.layout)
    click.echo(f"{len(cases)} cases ({cases[0].layout.name} layout)")
    report = check_cases(cases, root)
    for line in report.lines()[1:]:
        click.echo(line)
    if report.failures and config.data.on_error == "fail":
        click.echo(f"{len(report.failures)} of {len(cases)} cases cannot be loaded "
                   "(data.on_error: fail)", err=True)
        raise SystemExit(1)


@main.group("config")
def config_group():
    """Inspect experiment configs (see `lmstrain config show --help`)."""


@config_group.command("show")
@config_options
def config_show(config):
    """Print CONFIG resolved: defaults filled in, --set applied, paths made absolute.

    \b
    Example:
      lmstrain config show configs/demo.yaml --set train.epochs=3
    """
    click.echo(config.to_yaml(), nl=False)
