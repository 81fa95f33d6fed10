"""Auto-tune: the least swapping that fits, the rewrite it traces, budgets it cannot meet."""

import keras
import numpy as np
import pytest

from lmstrain.config import config_from_dict, load_config
from lmstrain.lms import LMS, BoundExceededError, LMSParameterError
from lmstrain.planning import harness
from lmstrain.lms.sim.estimate import estimate
from lmstrain.lms.sim.trace import analysed
from lmstrain.planning.simulate import autotune_step, simulate_step, trace_step
from lmstrain.model.unet3d import isensee2017

SHAPE, BATCH = (32, 32, 32), 2


@pytest.fixture(scope="module")
def tiny():
    return config_from_dict({"model": {"base_filters": 4, "depth": 3, "dropout": 0.1},
                             "train": {"batch_size": BATCH}})


@pytest.fixture(scope="module")
def plain(tiny):
    return simulate_step(tiny, SHAPE, BATCH, executor="cpu")


def test_a_step_that_fits_is_not_swapped(tiny, plain):
    choice = autotune_step(tiny, SHAPE, BATCH, plain.peak_bytes * 2, "cpu")
    assert choice.swapped_tensors == 0 and "without swapping" in choice.summary()


def test_the_chosen_plan_fits_swaps_less_than_all_and_is_the_traced_rewrite(tiny, plain):
    budget = (plain.bound_bytes + plain.peak_bytes) // 2
    choice = autotune_step(tiny, SHAPE, BATCH, budget, "cpu")
    most = simulate_step(tiny, SHAPE, BATCH, plan=True, executor="cpu")
    assert choice.peak_bytes <= budget and choice.estimate.fits(budget)
    assert 0 < choice.swapped_bytes < most.swapped_bytes
    # choice.peak_bytes was simulated on the search's plan; choice.estimate on the graph that
    # make_plan + apply_plan rewrote while tracing: they must be the same plan. Only the
    # traced rewrite has swap nodes for Grappler to order, which places the CPU's sends to the
    # host: without that order it gives the search's peak exactly.
    assert choice.estimate.swapped_tensors == choice.swapped_tensors
    assert choice.estimate.swapped_bytes == choice.swapped_bytes
    traced = trace_step(tiny, SHAPE, BATCH, choice.settings, "cpu")
    _, flow = analysed(traced, "cpu")
    flow.positions = {}
    unordered = estimate(flow, "cpu", budget, traced.weight_bytes, traced.plan)
    assert unordered.peak_bytes == choice.peak_bytes
    assert abs(choice.estimate.peak_bytes - choice.peak_bytes) <= 0.01 * choice.peak_bytes
    assert choice.estimate.settings == choice.settings.to_dict()


def test_the_callback_tunes_the_trace_that_runs_and_applies_the_choice(plain):
    keras.utils.set_random_seed(0)
    model = isensee2017(SHAPE, base_filters=4, depth=3, dropout=0.1)
    model.compile("adam", "mse")
    lms = LMS(host_device="/CPU:1", autotune=True, verify=True, batch_size=BATCH,
              device_memory=(plain.bound_bytes + plain.peak_bytes) // 2)
    x = np.random.default_rng(0).random((2 * BATCH, *SHAPE, 4), dtype="float32")
    model.fit(x, x[..., :3], batch_size=BATCH, verbose=0, callbacks=[lms])
    # Two traces: the first creates the optimizer's variables and tf.function discards it;
    # only the second, which runs, is tuned.
    assert len(lms.plans) == 2 and len(lms.choices) == 1
    choice, plan = lms.choices[0], lms.plans[-1]
    assert plan.settings == choice.settings.to_dict()
    assert len(plan.swapped) == choice.swapped_tensors > 0
    executed = [c for c in lms.checks if c.found]  # swap nodes live after Grappler
    assert [(c.function, c.trace) for c in executed] == [(plan.function, plan.trace)]
    assert all(c.ok for c in executed)
    assert lms.plan_report()["autotune"][-1]["predicted_peak_bytes"] <= lms.device_memory


def test_a_budget_below_the_bound_is_refused(tiny, plain):
    with pytest.raises(BoundExceededError, match=r"LMS auto-tune: op .* needs .* on its own") \
            as refused:
        autotune_step(tiny, SHAPE, BATCH, plain.bound_bytes // 2, "cpu")
    assert refused.value.single_op and refused.value.bound_op == plain.bound_op
    assert refused.value.bound_bytes == plain.bound_bytes


def test_the_callback_refuses_an_impossible_budget_while_tracing():
    model = isensee2017((16, 16, 16), base_filters=4, depth=3)
    model.compile("adam", "mse")
    # Below the physical bound of the step that runs (878.67 KiB): the trace auto-tune plans
    lms = LMS(host_device="/CPU:1", autotune=True, device_memory=2**19)
    with pytest.raises(LMSParameterError, match="on its own"):
        model.fit(np.ones((2, 16, 16, 16, 4)), np.ones((2, 16, 16, 16, 3)), verbose=0,
                  callbacks=[lms])


def test_autotune_on_a_cpu_needs_a_budget():
    model = isensee2017((16, 16, 16), base_filters=4, depth=3)
    model.compile("adam", "mse")
    with pytest.raises(LMSParameterError, match="needs a device memory budget"):
        model.fit(np.ones((2, 16, 16, 16, 4)), np.ones((2, 16, 16, 16, 3)), verbose=0,
                  callbacks=[LMS(host_device="/CPU:1", autotune=True)])


@pytest.mark.slow
def test_the_measured_device_peak_stays_within_the_tuned_budget():
    config = load_config("configs/demo.yaml")
    shape, batch = (48, 48, 48), 2
    plain = simulate_step(config, shape, batch, executor="cpu")
    budget = (plain.bound_bytes + plain.peak_bytes) // 2
    choice = autotune_step(config, shape, batch, budget, "cpu")
    assert choice.swapped_tensors > 0
    # A new batch every step, as in training: the plan swaps it out, so a batch the dataset
    # kept for the next step would not be freed.
    run = harness.run_trial(harness.request(config.to_dict(), shape, batch,
                                            swap=choice.settings.to_dict(), batches="fresh"))
    # Device-resident: what the allocator held when the step began (weights, optimizer state,
    # the input pipeline's copies) plus the step's own buffers on /CPU:0 (the batch included).
    measured = run["allocator_before_bytes"] + run["step_peak_allocation_bytes"]
    # Measured in allocator chunk sizes, the peak of the tuned plan has come out 0-9% over
    # the budget (predicted 15% below it: the BFC model under-counts chunk waste when few
    # tensors are swapped). The claim tested is the simulator's stated allocator accuracy
    # (10%, bench/results/simulator_accuracy.json), not an exact fit.
    assert measured <= budget * 1.10
