"""``lms.recompute: cheap``: cheap forward tensors recomputed in the backward pass instead of
swapped. The CPU is split into /CPU:0 and /CPU:1 (and more) by tests/conftest.py. Adds about
a minute to the default run."""

import keras
import numpy as np
import pytest

from lmstrain.config import config_from_dict
from lmstrain.errors import ConfigError
from lmstrain.lms import LMS, LMSParameterError, SwapSettings, record_graphs, verify_swaps
from lmstrain.lms.profile import replay as measure
from lmstrain.lms.sim.autotune import RECOMPUTE_MARGIN
from lmstrain.lms.sim.trace import batch_specs, estimate_trace, trace_train_step
from lmstrain.model.training import training_model
from lmstrain.model.unet3d import isensee2017
from lmstrain.planning.simulate import autotune_step, simulate_step
from profiling import ProfileStep


def train(lms=None, profile_dir=None):
    """Four steps of a small Isensee network (dropout 0); (losses, weights, recorded)."""
    keras.utils.set_random_seed(0)
    model = isensee2017((16, 16, 16), base_filters=4, depth=3, dropout=0.0)
    model.compile("adam", "mse")
    x = np.random.default_rng(0).random((4, 16, 16, 16, 4), dtype="float32")
    losses = []
    callbacks = [keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"])))]
    callbacks += [lms] if lms else []
    callbacks += [ProfileStep(2, profile_dir)] if profile_dir else []
    with record_graphs() as recorded:
        model.fit(x, x[..., :3], batch_size=1, shuffle=False, verbose=0, callbacks=callbacks)
    return losses, [w.numpy() for w in model.weights], recorded


def test_recomputing_trains_bit_for_bit_and_copies_less(tmp_path):
    plain_losses, plain_weights, _ = train()
    swap = LMS(host_device="/CPU:1", batch_size=1)
    swap_losses, _, _ = train(swap)
    both = LMS(host_device="/CPU:1", batch_size=1, recompute="cheap")
    losses, weights, recorded = train(both, profile_dir=tmp_path)
    assert losses == plain_losses == swap_losses
    assert all(np.array_equal(a, b) for a, b in zip(weights, plain_weights))
    plan, swap_plan = both.plans[-1], swap.plans[-1]
    # A block's normalised tensor and activation come back from the normalisation's input.
    assert len(plan.recomputed) >= 10
    recomputed = {r.tensor: r for r in plan.recomputed}
    activation = next(r for name, r in recomputed.items() if name.endswith("act_1/LeakyRelu:0"))
    assert activation.sources[0][0].endswith("norm_1/Reshape:0")
    swapped = {s.tensor for s in plan.swapped}
    assert sum(name not in swapped for name in recomputed) >= 10  # not copied out at all
    assert plan.swapped_bytes < 0.75 * swap_plan.swapped_bytes
    # An up-path activation is recomputed once both slices of the concatenation's gradient
    # are made, and its source comes back after the skip connection's slice has gone out.
    up = next(r for name, r in recomputed.items() if name.endswith("dec0_up_act_1/LeakyRelu:0")
              or name.endswith("dec0_up_norm_1/Reshape_3:0"))
    assert {t.rpartition("/")[2] for t in up.trigger} >= {"Slice", "Slice_1"}
    source, index = up.sources[0]
    serving = next(s for s in plan.swapped if s.tensor == source).swap_ins[index]
    assert any(t.endswith("dec0_concat_1/Slice:0") for t in serving.after_swap_outs)
    totals = plan.totals()
    assert totals["recomputed_tensors"] == len(plan.recomputed) and totals["recompute_ops"] > 10
    # The repeated ops survive Grappler on the compute device, every swap node is live, and
    # every swap-in (those feeding recomputations included) starts after its trigger.
    check = next(c for c in verify_swaps(recorded.run_metadata, [plan]) if c.found)
    assert check.ok and check.live_recompute_ops == check.recompute_ops > 10
    timings = measure.swapin_timings(measure.op_runs(measure.load_xspace(tmp_path)), [plan])
    assert {t.swap_in for t in timings} == {i.name for i in plan.swap_ins}
    assert [t for t in timings if not t.after_trigger] == []


def test_the_simulator_models_recomputation_as_the_rewrite_makes_it():
    config = config_from_dict({"model": {"base_filters": 4, "depth": 3}})
    specs = batch_specs([(1, 32, 32, 32, 4), (1, 32, 32, 32, 3)])
    swap, cheap = SwapSettings(), SwapSettings(recompute="cheap")
    plain = trace_train_step(training_model(config, (32, 32, 32)), specs)
    rewritten = trace_train_step(training_model(config, (32, 32, 32)), specs, cheap)
    traced = estimate_trace(rewritten, "cpu")  # the rewrite's clones, analysed as traced
    added = estimate_trace(plain, "cpu", settings=cheap)  # the same plan added to the dataflow
    swapped = estimate_trace(plain, "cpu", settings=swap)
    # Not to the byte: the traced graph's node order and names differ from the added nodes'.
    assert traced.op_output_peak_bytes == pytest.approx(added.op_output_peak_bytes, rel=0.05)
    assert traced.flops == added.flops
    assert swapped.flops < added.flops < 1.01 * swapped.flops  # the repeated element-wise ops
    assert added.swapped_bytes < swapped.swapped_bytes
    assert added.swapped_in_bytes < swapped.swapped_in_bytes


def test_recompute_is_a_checked_setting():
    with pytest.raises(ConfigError,
                       match=r"lms\.recompute: expected one of none, cheap, auto, got .all."):
        config_from_dict({"lms": {"recompute": "all"}})
    assert config_from_dict({"lms": {"recompute": "cheap"}}).lms.recompute == "cheap"


def test_auto_tune_recomputes_when_that_copies_less_within_its_margin():
    lms = {"autotune": True, "recompute": "auto"}
    auto = config_from_dict({"model": {"base_filters": 4, "depth": 2}, "lms": lms})
    swap_only = config_from_dict({"model": {"base_filters": 4, "depth": 2},
                                  "lms": {**lms, "recompute": "none"}})
    shape = (16, 16, 16)
    plain = simulate_step(auto, shape, 1, executor="cpu")

    def copied(choice):
        return choice.estimate.swapped_bytes + choice.estimate.swapped_in_bytes

    # A tight budget: swapping alone must copy nearly everything; recomputing copies less.
    budget = int(0.5 * plain.peak_bytes)
    choice = autotune_step(auto, shape, 1, budget, "cpu", retrace=False)
    alone = autotune_step(swap_only, shape, 1, budget, "cpu", retrace=False)
    assert {settings["recompute"] for settings, _ in choice.tried} == {"none", "cheap"}
    assert choice.settings.recompute == "cheap" and "recompute=cheap" in choice.summary()
    assert choice.peak_bytes <= budget / (1 + RECOMPUTE_MARGIN)
    assert copied(choice) < copied(alone)
    # A loose one: swapping a few tensors copies less than any recomputing plan under the margin.
    loose = autotune_step(auto, shape, 1, int(0.95 * plain.peak_bytes), "cpu", retrace=False)
    assert loose.settings.recompute == "none" and loose.swapped_tensors > 0


def test_auto_recompute_needs_auto_tune():
    with pytest.raises(ConfigError, match=r"lms\.recompute: auto is decided by auto-tune"):
        config_from_dict({"lms": {"recompute": "auto"}})
    with pytest.raises(LMSParameterError, match="recompute='auto' is decided by auto-tune"):
        LMS(recompute="auto")
