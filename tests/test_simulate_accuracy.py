"""The simulator against a measurement (a subprocess with the BFC allocator and the profiler)."""

import keras

from lmstrain.config import load_config
from lmstrain.lms.sim.trace import analysed
from lmstrain.planning import harness
from lmstrain.planning.simulate import simulate_step, trace_step


def test_predicted_peaks_match_a_measured_step():
    config = load_config("configs/demo.yaml")
    shape, batch = (48, 48, 48), 2
    predicted = simulate_step(config, shape, batch, executor="cpu")
    run = harness.run_trial(harness.request(config.to_dict(), shape, batch, op_order=True))
    # Op outputs of the step on the device, from the profiler's allocation events.
    assert abs(predicted.step_peak_bytes / run["step_peak_bytes"] - 1) <= 0.05
    # What the allocator grew by during the step (chunk rounding and kernel scratch included).
    measured = run["allocator_peak_bytes"] - run["allocator_before_bytes"]
    resident = sum(predicted.resident.values())
    assert abs((predicted.peak_bytes - resident) / measured - 1) <= 0.10
    # The measured op order names the simulated kernels (scripts/compare_order.py pairs
    # them); Grappler removes views (Reshape, Identity) and fuses a few others. Keras numbers
    # the model's and the optimizer's scopes by what the process built before: traced as in
    # the trial's fresh process.
    keras.backend.clear_session()
    _, flow = analysed(trace_step(config, shape, batch), "cpu")
    ran = {name.removeprefix("StatefulPartitionedCall/") for name in run["op_order"]}
    kernels = {node.name for node in flow.nodes if node.expensive}
    assert len(kernels & ran) >= 0.95 * len(kernels)
