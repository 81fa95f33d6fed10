"""The public ``LMS`` Keras callback: swap activations to host memory during training."""

import contextlib
import dataclasses
import functools
import logging
from typing import Any

import keras
import tensorflow as tf

from lmstrain.lms import _tf, devices
from lmstrain.lms.errors import LMSParameterError
from lmstrain.lms.graph import StepGraph, owns_batch
from lmstrain.lms.pipeline import SwapTarget, rewrite_step
from lmstrain.lms.plan import SwapPlan
from lmstrain.lms.settings import COPY_MODES, SwapSettings, check_choice
from lmstrain.lms.sim import autotune as tuning
from lmstrain.lms.sim import dataflow
from lmstrain.lms.sim.trace import resident_variables, trainable_bytes
from lmstrain.lms.units import format_bytes
from lmstrain.lms.verify import SwapCheck, verify_swaps

log = logging.getLogger("lmstrain.lms")


class LMS(keras.callbacks.Callback):
    """Large Model Support: swap forward activations to the host and back for the backward pass.

    While Keras traces the training step, the callback edits the traced graph: each forward
    tensor that a backward op reads later is copied to ``host_device`` (swap-out) and copied
    back (swap-in) shortly before its backward consumers run, so the device does not have to
    hold it in between. Works on any Keras 3 model with the TensorFlow backend::

        model.fit(x, y, batch_size=8, callbacks=[LMS(batch_size=8)])

    The swap settings are those of :class:`~lmstrain.lms.settings.SwapSettings`, given as
    ``settings`` or as keyword arguments (``LMS(swapout_threshold=3)``):

    Args:
        settings: a :class:`SwapSettings`; keyword arguments of the same names override it.
        min_tensor_bytes: smallest tensor that is swapped.
        swapout_threshold: swap a tensor for the backward consumers that are more than this
            many topological levels after its producer; nearer consumers keep the original.
        swapin_ahead: start each swap-in after a backward op this many levels before the
            consumer (the prefetch distance).
        swapin_groupby: consumers whose levels are within this distance share one swap-in.
        sync_mode: extra waits. ``"swapout"``: the producer's forward consumers wait for the
            swap-out, so the original is freed as soon as the forward pass no longer needs it
            (the default: without it, measured peaks did not drop, see docs). ``"swapin"``: the
            swap-in waits for all other inputs of its consumer (latest possible copy).
            ``"both"``; ``"async"``: only the prefetch trigger.
        include_types, exclude_types: op types whose outputs are (only / never) swapped.
        include_scopes, exclude_scopes: name scopes whose op outputs are (only / never)
            swapped; a scope matches whole name components (``enc0_ctx1_conv``).
        host_device: where swapped tensors wait. None (the default) picks /CPU:1 when the model
            runs on a CPU split by :func:`lmstrain.lms.split_cpu`, else /CPU:0. Under a
            ``tf.distribute`` strategy: one device for every replica, a list with one per
            replica, or None (see :func:`lmstrain.lms.devices.replica_hosts`).
        compute_device: where the model runs; None = the first GPU, else the first CPU.
            When it is the host device, the callback says so and leaves the graph alone.
            Under a strategy each replica computes on its own device, and this must be None.
        autotune: choose ``swapout_threshold``, ``swapin_ahead`` and ``swapin_groupby`` for
            each traced step that runs with the memory simulator (not the first trace, which
            creates the optimizer's variables and is discarded): the least swapping that fits
            ``device_memory``, then the earliest prefetch that still fits
            (:mod:`lmstrain.lms.sim.autotune`); the other settings are kept. Raises
            :class:`LMSParameterError` when even the physical bound does not fit.
        device_memory: the device's memory budget in bytes for auto-tuning; None = the GPU's
            memory as TensorFlow reports it (required on a CPU).
        verify: log, per traced function, how many swap nodes survived Grappler.
        copy_mode: ``"snapshot"`` (default; on a GPU the transfer is the copy) or
            ``"deepcopy"``, which forces a real copy between logical CPUs so that memory
            measurements on CPU see the swap.
        batch_size: the batch size, for tensor sizes when the traced step's batch dimension is
            unknown (``model.fit`` on arrays whose length the batch does not divide); None =
            the traced shape (batch with ``drop_remainder=True`` to make it static).

    Numerics: swap nodes copy bit for bit and the planner keeps Grappler's arithmetic
    rewrites (add chains into AddN, associative reordering, Div/Sqrt, Square/Sub, Log/Softmax)
    possible, so training rounds as without swapping; other Grappler rewrites a swap may stop
    can change the rounding at float precision, never what is computed (see the README).
    While training, Grappler's memory optimizer is off (the swap plan manages memory; its
    running sums would leave a constant on the device, see
    :func:`lmstrain.lms._tf.without_memory_optimizer`).

    Under a ``tf.distribute`` strategy (``MirroredStrategy``: build and compile the model in
    its scope), one traced function holds every replica's step; each replica's ops are planned
    and rewritten on their own, between that replica's device and its host, at the per-replica
    batch.

    After training, ``plans`` holds one :class:`~lmstrain.lms.plan.SwapPlan` per traced
    function and replica, ``checks`` the :class:`~lmstrain.lms.verify.SwapCheck` of each
    (verify=True) and ``choices`` the :class:`~lmstrain.lms.sim.autotune.Choice` of each
    auto-tuned trace (autotune=True).
    """

    def __init__(self, settings: SwapSettings | None = None, *, host_device: str | None = None,
                 compute_device: str | None = None, autotune: bool = False,
                 device_memory: int | None = None, verify: bool = False,
                 copy_mode: str = "snapshot", batch_size: int | None = None,
                 **swap_settings: Any):
        super().__init__()
        self.settings = _settings(settings, swap_settings)
        check_choice("autotune", autotune, (True, False))
        if self.settings.recompute == "auto" and not autotune:
            raise LMSParameterError(
                "LMS recompute='auto' is decided by auto-tune: pass autotune=True (lms.autotune: "
                "true) with a device memory budget, or choose recompute 'none' or 'cheap'.",
                key="recompute")
        check_choice("verify", verify, (True, False))
        check_choice("copy_mode", copy_mode, COPY_MODES)
        for name, value in (("device_memory", device_memory), ("batch_size", batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value <= 0):
                raise LMSParameterError(f"LMS {name} must be a positive integer or None; got "
                                        f"{value!r}.", key=name)
        self.host_device = ([devices.check_spec(h, "host_device") for h in host_device]
                            if isinstance(host_device, (list, tuple))
                            else devices.check_spec(host_device, "host_device"))
        self.compute_device = devices.check_spec(compute_device, "compute_device")
        self.device_memory = device_memory
        self.autotune = autotune
        self.verify = verify
        self.copy_mode = copy_mode
        self.batch_size = batch_size
        self.plans: list[SwapPlan] = []
        self.checks: list[SwapCheck] = []
        self.choices: list[tuning.Choice] = []
        self._replicas: list[tuple[str, str]] = []  # (compute, host) per replica
        self._distributed = False
        self._budget = None
        self._said_same_device = False
        self._restore = contextlib.ExitStack()

    @property
    def active(self):
        """True when the callback rewrites the model's training step."""
        return any(compute != host for compute, host in self._replicas)

    def set_model(self, model):
        """Check the devices (the constructor must not initialise TensorFlow's devices)."""
        super().set_model(model)
        if keras.backend.backend() != "tensorflow":
            raise LMSParameterError(
                f"LMS needs Keras's TensorFlow backend; this Keras uses "
                f"{keras.backend.backend()!r} (set KERAS_BACKEND=tensorflow).")
        replicas = tuple(devices.resolve(r, "compute_device")
                         for r in devices.replica_devices(model.distribute_strategy))
        self._distributed = bool(replicas)
        if replicas:
            self._replicas = list(zip(replicas, devices.replica_hosts(replicas, self.host_device)))
            _check_replicas(self._replicas, self.compute_device)
        else:
            compute = devices.resolve(self.compute_device or devices.default_compute_device(),
                                      "compute_device")
            if not isinstance(self.host_device, (str, type(None))):
                raise LMSParameterError(
                    f"LMS host_device is a list ({self.host_device!r}), but the model has no "
                    f"tf.distribute strategy with replicas; give one device name.",
                    key="host_device")
            host = devices.resolve(self.host_device or devices.default_host_device(compute),
                                   "host_device")
            self._replicas = [(compute, host)]
        compute, host = self._replicas[0]
        if self.autotune and self.active:
            self._budget = self.device_memory or devices.memory_limit(compute)
            if not self._budget:
                raise LMSParameterError(
                    f"LMS autotune=True needs a device memory budget: the compute device "
                    f"{devices.short(compute)} does not report one. Pass device_memory in bytes "
                    f"(e.g. LMS(autotune=True, device_memory=16 * 2**30)) or set "
                    f"lms.device_memory (e.g. 16GiB).")
        if compute == host and not self._said_same_device:
            log.warning("LMS: compute device and host device are both %s; swapping would "
                        "move nothing, so the training step is left unchanged.",
                        devices.short(compute))
            self._said_same_device = True

    def on_train_begin(self, logs=None):
        """Wrap ``train_step`` so that every trace of it is rewritten, and rebuild the step."""
        model = self.model
        if not self.active:
            return
        if model.run_eagerly:
            log.warning("LMS: the model runs eagerly (run_eagerly=True): there is no traced "
                        "step to rewrite, so nothing is swapped.")
            return
        self._restore.close()  # a previous fit that raised may have left changes in place
        if model.jit_compile:
            log.warning("LMS: turning XLA off (jit_compile=False) while swapping: XLA "
                        "compiles the swap nodes away.")
            self._restore.callback(setattr, model, "jit_compile", model.jit_compile)
            model.jit_compile = False
        if self.copy_mode == "deepcopy":
            self._restore.enter_context(_tf.order_insensitive("DeepCopy"))
        self._restore.enter_context(_tf.without_memory_optimizer())
        if not self._wrapped():  # still wrapped if a previous fit raised
            model.train_step = self._wrap(model.train_step)
        model.make_train_function(force=True)
        if self.verify:
            _tf.start_graph_collection()
            self._restore.callback(_tf.stop_graph_collection)

    def _wrap(self, train_step):
        @functools.wraps(train_step)
        def lms_train_step(data):
            created = []
            with tf.variable_creator_scope(functools.partial(_record_creation, created)):
                outputs = train_step(data)
            if tf.inside_function():
                self._rewrite(tf.compat.v1.get_default_graph(), data, outputs,
                              creates_variables=bool(created))
            return outputs

        lms_train_step.lms_callback = self
        return lms_train_step

    def _rewrite(self, graph, data, outputs, creates_variables):
        """Rewrite the traced step. A trace that creates variables (the optimizer's, on the
        first call) is one ``tf.function`` discards: it lifts the variables out and traces the
        step again. That trace gets the settings as given; auto-tune waits for the next."""
        batch_size, source = self._batch_size(data)
        returned = [t for t in tf.nest.flatten(outputs) if isinstance(t, tf.Tensor)]
        replica, compute, host = self._tracing_replica()
        steps = getattr(self.model, "steps_per_execution", 1) or 1
        target = SwapTarget(compute, host, self.copy_mode,
                            owns_batch(devices.is_gpu(compute), steps), replica)
        tune = self.autotune and not creates_variables
        if self.autotune and creates_variables:
            log.info("LMS: %s: this trace creates variables, and TensorFlow traces the step "
                     "again without them; auto-tune waits for that trace.", graph.name)
        plan = rewrite_step(graph, returned, batch_size, target,
                            self._tune if tune else self.settings,
                            function=graph.name, trace=len(self.plans) + 1,
                            batch_size_source=source)
        self.plans.append(plan)
        log.info("LMS: %s: %s", plan.label, plan.summary())
        for note in plan.notes:
            log.warning("LMS: %s: %s", plan.label, note)

    def _tracing_replica(self) -> tuple[int | None, str, str]:
        """``(replica, compute device, host device)`` of the step being traced; replica None
        without a strategy. Replica ids count across workers; each worker holds the same
        number of replicas, its own in order."""
        if not self._distributed:
            return (None, *self._replicas[0])
        replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
        replica = int(tf.get_static_value(replica_id)) % len(self._replicas)
        return (replica, *self._replicas[replica])

    def _tune(self, step: StepGraph) -> SwapSettings:
        """Auto-tuned settings for ``step`` (see :mod:`lmstrain.lms.sim.autotune`); logs the
        choice."""
        replica, compute, host = self._tracing_replica()
        executor = "gpu" if devices.is_gpu(compute) else "cpu"
        flow = dataflow.build(step, compute, resident_variables(self.model), executor == "cpu")
        target = SwapTarget(compute, host, self.copy_mode, step.batch_owned, replica)
        choice = tuning.tune(step, flow, self.settings, self._budget, target,
                             executor=executor, weight_bytes=trainable_bytes(self.model))
        self.choices.append(choice)
        log.info("%s", choice.summary())
        limit = devices.host_memory_limit()
        if executor == "gpu" and choice.estimate.host_bytes > limit:
            log.warning("LMS: the plan keeps %s of swapped tensors in host memory, more than "
                        "TensorFlow's pinned host allocator allows (%s). Set "
                        "TF_GPU_HOST_MEM_LIMIT_IN_MB=%d before TensorFlow starts (lmstrain fit "
                        "does).", format_bytes(choice.estimate.host_bytes), format_bytes(limit),
                        choice.estimate.host_bytes // 2**20 + 1)
        return choice.settings

    def _batch_size(self, data):
        for tensor in tf.nest.flatten(data):
            if isinstance(tensor, tf.Tensor) and tensor.shape.rank:
                if tensor.shape[0] is not None:
                    return tensor.shape[0], "traced shape"
                break
        if self.batch_size:
            return self.batch_size, "LMS batch_size"
        log.warning("LMS: batch size unknown while tracing; tensor sizes are per sample. "
                    "Pass LMS(batch_size=N), or batch with drop_remainder=True to give the "
                    "traced step static shapes.")
        return 1, "unknown (sizes per sample)"

    def on_train_batch_end(self, batch, logs=None):
        if self._wrapped() and self.verify and len(self.checks) < len(self.plans):
            self._check_plans(final=False)

    def on_train_end(self, logs=None):
        """Check the remaining plans, give the model back its own training step, and undo the
        process-wide changes made for training (XLA off, DeepCopy ordering, the memory
        optimizer off, graph collection)."""
        if not self._wrapped():
            return
        if self.verify:
            self._check_plans(final=True)
        del self.model.train_step
        self.model.train_function = None
        self._restore.close()

    def _wrapped(self):
        step = self.model.__dict__.get("train_step") if self.model is not None else None
        return getattr(step, "lms_callback", None) is self

    def _check_plans(self, final):
        """Check the plans whose functions have run since the last call; log one line each."""
        checked = {(c.function, c.trace) for c in self.checks}
        pending = [p for p in self.plans if (p.function, p.trace) not in checked]
        for plan, check in zip(pending, verify_swaps(_tf.collect_graphs(), pending)):
            if check.found or final:
                self.checks.append(check)
                (log.info if check.ok or not check.found else log.warning)(check.summary(plan))

    def plan_report(self):
        """Everything the callback did, JSON-serialisable (write it as ``lms_plan.json``).

        ``replicas`` lists each replica's devices and what its plans swap; ``functions`` holds
        every plan (one per traced function and replica) with its ``replica``."""
        return {
            "active": self.active,
            "distributed": self._distributed,
            "replicas": [_replica_report(i, compute, host, self.plans, self._distributed)
                         for i, (compute, host) in enumerate(self._replicas)],
            "copy_mode": self.copy_mode,
            "device_memory": self.device_memory,
            "settings": self.settings.to_dict(),
            "autotune": [{"summary": c.summary(), "settings": c.settings.to_dict(),
                          "predicted_peak_bytes": c.peak_bytes,
                          "candidates": len(c.tried)} for c in self.choices],
            "functions": [plan.to_dict() for plan in self.plans],
            "checks": [{**vars(check), "ok": check.ok} for check in self.checks],
        }


def _replica_report(index, compute, host, plans, distributed):
    """One replica's devices and the totals of its last plan (the step that trained)."""
    own = [p for p in plans if p.replica == (index if distributed else None)]
    last = own[-1] if own else None
    return {"replica": index, "compute_device": compute, "host_device": host,
            "traces": [p.trace for p in own],
            "swapped_tensors": len(last.swapped) if last else 0,
            "swapped_bytes": last.swapped_bytes if last else 0}


def _record_creation(created: list, next_creator, **kwargs):
    """A ``tf.variable_creator_scope`` creator that notes each variable created."""
    created.append(kwargs.get("name"))
    return next_creator(**kwargs)


def _check_replicas(replicas, compute_device):
    """Refuse settings that cannot hold under a strategy (one device per replica)."""
    if compute_device is not None:
        raise LMSParameterError(
            f"LMS compute_device={compute_device!r} does not apply under a tf.distribute "
            f"strategy: each replica computes on its own device "
            f"({', '.join(devices.short(c) for c, _ in replicas)}). Leave it None.",
            key="compute_device")
    for i, (_, host) in enumerate(replicas):
        if any(devices.same(host, c) for c, _ in replicas):
            raise LMSParameterError(
                f"LMS host_device for replica {i} is {devices.short(host)}, a device a replica "
                f"computes on; give a host device no replica uses.", key="host_device")


def _settings(settings: SwapSettings | None, overrides: dict) -> SwapSettings:
    """``settings`` (or the defaults) with ``overrides`` by name; unknown names are refused."""
    known = SwapSettings.__dataclass_fields__
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise LMSParameterError(f"LMS got unknown argument(s) {', '.join(unknown)}; swap "
                                f"settings are {', '.join(known)}.", key=unknown[0])
    if settings is not None and not isinstance(settings, SwapSettings):
        raise LMSParameterError(f"LMS settings must be a SwapSettings; got {settings!r}.",
                                key="settings")
    return dataclasses.replace(settings or SwapSettings(), **overrides)
