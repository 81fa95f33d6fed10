"""Training: ``fit`` starts a run, ``resume`` continues one (see :mod:`lmstrain.training.rundir`)."""

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import keras
import yaml

from lmstrain.config import (config_from_dict, require_data_root, save_config, split_seed,
                             swap_settings)
from lmstrain.data.brats import discover_cases
from lmstrain.data.cache import VolumeCache
from lmstrain.data.pipeline import input_errors, make_dataset, prepare_cases
from lmstrain.data.preprocess import Settings
from lmstrain.data.split import load_split, save_split, split_cases
from lmstrain.errors import UserError
from lmstrain.lms import LMS, devices, split_cpu
from lmstrain.model.training import training_model
from lmstrain.training import cluster, distribute, memcheck
from lmstrain.training.callbacks import EpochProgress, RunRecorder
from lmstrain.training.rundir import RunFiles, check_output_root, create_run_dir, writing

log = logging.getLogger("lmstrain.training.fit")


@dataclass
class RunResult:
    run_dir: Path | None  # None on a multi_worker worker other than the chief
    summary: dict
    worker: cluster.Worker | None = None  # this process's place in a multi_worker cluster


def fit(config):
    """Train a new run for ``config``; return its :class:`RunResult`.

    Under ``train.distribute: multi_worker`` every worker calls this; the chief creates and
    writes the run directory, the others write nothing there (their ``run_dir`` is None).
    """
    prepare_devices(config)
    strategy = distribute.make_strategy(config)
    chief = _is_chief(strategy)
    if chief:
        check_output_root(config.output.root)
    root = require_data_root(config)
    cases = discover_cases(root, config.data.layout)
    if config.data.max_cases:
        cases = cases[:config.data.max_cases]
    cases = prepare_cases(cases, volume_cache(config), config.data.on_error)
    train_cases, val_cases = split_cases(cases, config.data.val_fraction, split_seed(config))
    distribute.steps_per_epoch(config, len(train_cases), _global_batch(config, strategy))
    if not chief:
        return _train(config, strategy, None, train_cases, val_cases, writes=False)
    run_dir = create_run_dir(config.output.root, config.output.name or "run")
    files = RunFiles(run_dir)
    with files.lock():
        with writing(run_dir / "config.yaml"):
            save_config(config, run_dir / "config.yaml")
        with writing(run_dir / "split.json"):
            save_split(run_dir / "split.json", train_cases, val_cases, split_seed(config))
        log.info("Run directory: %s", run_dir)
        log.info("%d cases: %d for training, %d for validation", len(cases), len(train_cases),
                 len(val_cases))
        return _train(config, strategy, files, train_cases, val_cases)


def resume(run_dir, overrides=()):
    """Continue the run in ``run_dir`` from its last finished epoch.

    ``overrides`` (``--set`` strings) may change only ``train.epochs``. Holds the run
    directory's lock: a second process on the same run is refused before it writes anything.
    Under multi_worker every worker resumes from the chief's run directory, which must be on
    a file system they share; the workers other than the chief read it and write nothing.
    """
    files = RunFiles(run_dir)
    if not (files.checkpoints / "state.json").exists():
        raise _no_epoch_to_resume(run_dir)
    saved = yaml.safe_load((files.run_dir / "config.yaml").read_text())
    config = config_from_dict(saved, overrides)
    _check_only_epochs_changed(config_from_dict(saved).to_dict(), config.to_dict())
    prepare_devices(config)
    strategy = distribute.make_strategy(config)
    if not _is_chief(strategy):
        return _resume_from_state(files, config, strategy, writes=False)
    with files.lock():
        return _resume_from_state(files, config, strategy)


def _resume_from_state(files, config, strategy, writes=True):
    run_dir = files.run_dir
    state = files.read_state()
    if not (files.checkpoints / state["checkpoint"]).exists():
        raise _no_epoch_to_resume(run_dir)
    if config.train.epochs <= state["epoch"]:
        raise UserError(f"{run_dir} already completed {state['epoch']} of {config.train.epochs} "
                        f"epochs; pass --set train.epochs=N with N > {state['epoch']} to continue")
    cases = discover_cases(require_data_root(config), config.data.layout)
    train_cases, val_cases = load_split(run_dir / "split.json", cases)
    prepare_cases(train_cases + val_cases, volume_cache(config), "fail")
    if writes:
        with writing(run_dir / "config.yaml"):
            save_config(config, run_dir / "config.yaml")
    log.info("Resuming %s after epoch %d of %d", run_dir, state["epoch"], config.train.epochs)
    return _train(config, strategy, files, train_cases, val_cases, writes=writes)


def _no_epoch_to_resume(run_dir):
    shared = (" (or this worker cannot read it: under multi_worker every worker resumes from "
              "the chief's run directory, which must be on a file system all workers share, "
              "at the same path)") if cluster.in_cluster() else ""
    return UserError(f"{run_dir} has no finished epoch to resume from{shared}; start a new run "
                     "with `lmstrain fit`")


def _is_chief(strategy) -> bool:
    """Whether this process writes the run directory: always, except on the workers of a
    multi_worker run other than the chief."""
    worker = distribute.worker(strategy)
    return worker is None or worker.is_chief


def _global_batch(config, strategy) -> int:
    return config.train.batch_size * strategy.num_replicas_in_sync


def prepare_devices(config):
    """Before TensorFlow starts its devices. With a GPU, when swapping is on or may be
    (``auto``), let TensorFlow's pinned host allocator use all of this machine's RAM for
    swapped tensors (``devices.host_memory_environment``). Without one, split the CPU into the
    logical devices the run needs: a compute device (/CPU:0) and a host (/CPU:1) to swap
    between, or for ``train.distribute: mirrored`` the replicas and their hosts
    (:func:`lmstrain.training.distribute.logical_cpus`)."""
    swapping = config.lms.enabled is not False
    if devices.has_gpu():
        if swapping:
            os.environ.update(devices.host_memory_environment())
        return
    count = distribute.logical_cpus(config, swapping)
    if count > 1:
        split_cpu(count)


def lms_callback(config, swap, batch_size):
    """The swap callback configured by ``config.lms`` when ``swap``, else None."""
    if not swap:
        return None
    c = config.lms
    return LMS(swap_settings(config), host_device=c.host_device,
               compute_device=c.compute_device, autotune=c.autotune,
               device_memory=c.device_memory, verify=c.verify, copy_mode=c.copy_mode,
               batch_size=batch_size)


def _train(config, strategy, files, train_cases, val_cases, writes=True):
    """Train in ``strategy``'s scope. ``writes`` False (``files`` None for a new run): a worker
    of a multi_worker run other than the chief, which trains in step with the others and
    writes nothing to the run directory."""
    started = time.time()
    memory = memcheck.check(config)
    keras.utils.set_random_seed(config.train.seed)
    t = config.train
    parallel = distribute.describe(config, strategy)
    batch = parallel["global_batch_size"]
    steps = distribute.steps_per_epoch(config, len(train_cases), batch)
    summary = (files.read_json("summary.json") if files else None) or {
        "n_train_cases": len(train_cases), "n_validation_cases": len(val_cases)}
    summary["distribute"] = parallel
    recorder = RunRecorder(files, summary, writes=writes)
    train_ds, val_ds = _datasets(config, strategy, train_cases, val_cases, steps,
                                 recorder.epochs_completed)

    with _collective_errors(config, strategy):
        with strategy.scope():
            model = training_model(config, steps_per_epoch=steps)
        log.info("Model %s: %s parameters, input %s", model.name, f"{model.count_params():,}",
                 "x".join(map(str, config.data.shape)))
        worker = distribute.worker(strategy)
        _log_replicas(parallel, worker, steps)

        if recorder.epochs_completed:
            if writes:  # a kill may have come between state.json and last.keras
                files.publish(recorder.state)
            with strategy.scope():
                model.optimizer.build(model.trainable_variables)
            model.load_weights(files.checkpoints / recorder.state["checkpoint"])
        else:
            with input_errors():
                initial = model.evaluate(val_ds, verbose=0, return_dict=True)
            summary["initial_metrics"] = {f"val_{k}": float(v) for k, v in initial.items()}
            log.info("Untrained model: val_dice_mean %.4f", initial["dice_mean"])

        callbacks = [recorder, EpochProgress(steps)]
        if writes:
            callbacks.append(keras.callbacks.TensorBoard(files.run_dir / "tensorboard",
                                                         write_graph=False))
        if t.lr_schedule == "plateau":
            callbacks.append(keras.callbacks.ReduceLROnPlateau("val_loss", factor=0.5,
                                                               patience=10))
        swap = lms_callback(config, memory.swap, t.batch_size)
        if swap:
            callbacks.append(swap)
        device = f"/{memory.device}"
        memcheck.reset_peak(device)
        with input_errors():
            model.fit(train_ds, epochs=t.epochs, initial_epoch=recorder.epochs_completed,
                      shuffle=False, steps_per_epoch=steps, validation_data=val_ds,
                      callbacks=callbacks, verbose=0)
    recorder.summary["memory"] = memory.record(*memcheck.measured_peak(device))
    if swap:
        if writes:
            files.write_json("lms_plan.json", swap.plan_report())
        recorder.summary["lms"] = {"active": swap.active,
                                   "swapped_bytes_per_step": swap.plans[-1].swapped_bytes
                                   if swap.plans else 0}
    recorder.finish(time.time() - started)
    if recorder.nan_epoch is not None:
        raise recorder.nan_error(t.learning_rate, t.mixed_precision)
    return RunResult(files.run_dir if writes else None, recorder.summary, worker)


def _log_replicas(parallel, worker, steps):
    batch, per_replica = parallel["global_batch_size"], parallel["batch_size_per_replica"]
    if worker:
        log.info("Worker %d of %d (%s, cluster from %s)%s: %d replicas in all, batch %d per "
                 "replica, %d per step, %d steps per epoch", worker.index, worker.workers,
                 worker.task, worker.source, " the chief" if worker.is_chief else "",
                 parallel["replicas"], per_replica, batch, steps)
    elif parallel["replicas"] > 1:
        log.info("%d replicas (%s), batch %d per replica, %d per step", parallel["replicas"],
                 ", ".join(parallel["devices"]), per_replica, batch)


def _datasets(config, strategy, train_cases, val_cases, steps, epochs_completed):
    """The training and validation data. One process: batches at the global batch, which
    Keras splits among the replicas. multi_worker: per worker (``distribute_datasets_from_
    function``), each epoch one pass of a new permutation without its remainder, the
    training batches dealt out in turn (worker w reads the w-th of every ``workers`` blocks
    of its replicas' batches, so together they read what one process would), resumed at
    the pass after the last finished epoch; every worker validates on every validation
    case, so that each computes the same number."""
    cache = volume_cache(config)
    t = config.train
    worker = distribute.worker(strategy)
    if worker is None:
        batch = _global_batch(config, strategy)
        return (make_dataset(train_cases, cache, batch, training=True, seed=t.seed,
                             flip=config.data.flip),
                make_dataset(val_cases, cache, batch, training=False))
    local = len(strategy.extended.worker_devices)

    def train(context):
        return worker_training_data(config, train_cases, steps, epochs_completed,
                                    context.input_pipeline_id, context.num_input_pipelines,
                                    local)

    def validation(_context):
        return make_dataset(val_cases, cache, t.batch_size, training=False)

    return (strategy.distribute_datasets_from_function(train),
            strategy.distribute_datasets_from_function(validation))


def worker_training_data(config, train_cases, steps: int, epochs_completed: int, worker: int,
                         workers: int, local_replicas: int):
    """The training batches (one replica's each) of worker ``worker`` of ``workers``, each with
    ``local_replicas`` replicas, for epochs of ``steps`` steps, from the pass after
    ``epochs_completed`` on."""
    t = config.train
    block = t.batch_size * local_replicas
    return make_dataset(train_cases, volume_cache(config), t.batch_size, training=True,
                        seed=t.seed, flip=config.data.flip, pass_length=steps * block * workers,
                        first_pass=epochs_completed, shard=(worker, workers, block))


@contextmanager
def _collective_errors(config, strategy):
    """Under multi_worker, a lost worker's error as a one-line :class:`RunError`."""
    worker = distribute.worker(strategy)
    if worker is None:
        yield
        return
    with cluster.lost_worker_errors(worker, strategy.cluster_resolver,
                                    config.train.worker_timeout):
        yield


def volume_cache(config):
    """The preprocessed-volume cache for ``config``'s data settings."""
    return VolumeCache(config.data.cache_dir, Settings.from_config(config))


def _check_only_epochs_changed(before, after):
    for section, values in before.items():
        for key, value in values.items():
            if (section, key) != ("train", "epochs") and after[section][key] != value:
                raise UserError(
                    f"--resume can only change train.epochs, not {section}.{key} "
                    f"({value!r} -> {after[section][key]!r}); start a new run with `lmstrain fit`")
