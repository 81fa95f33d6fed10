"""The memory simulator's parts on small graphs whose answers are known by hand."""

import pytest
import tensorflow as tf

from lmstrain.config import config_from_dict, load_config
from lmstrain.lms import SwapSettings
from lmstrain.lms.sim import bfc, dataflow, liveness, schedule
from lmstrain.planning.simulate import simulate_step, trace_step
from lmstrain.lms.sim.dataflow import Dataflow, Node, Output
from lmstrain.lms.sim.trace import analysed
from lmstrain.lms.graph import StepGraph
from lmstrain.planning.sizing import candidate_shapes, scaled_shape

MIB = 2**20


def node(name, kind, inputs=(), out=None, preds=None, expensive=True, forwards=False):
    n = Node(name, kind, "forward", False, list(inputs),
             list(preds if preds is not None else [t.split(":")[0] for t in inputs]),
             expensive=expensive, forwards=forwards)
    if out is not None:
        n.outputs.append(Output(f"{name}:0", out, out // 4, "float32"))
    return n


def chain():
    """conv (100 B) -> relu (in place) -> conv2 (40 B) -> square(x, x) (40 B)."""
    return Dataflow([
        node("conv", "Conv3D", out=100),
        node("relu", "Relu", ["conv:0"], 100, forwards=True),
        node("conv2", "Conv3D", ["relu:0"], 40),
        node("mul", "Mul", ["conv2:0", "conv2:0"], 40, forwards=True),
    ], {"weights": 8}, {}, [8])


def test_liveness_forwards_in_place_and_frees_after_the_last_reader():
    flow = chain()
    timeline = liveness.replay(flow, flow.nodes)
    # relu writes into conv's buffer; conv2 needs it and its own output: 140 B. mul reads
    # conv2's output twice, so it cannot write in place: 40 + 40 B.
    assert timeline.device_bytes == [100, 100, 140, 80]
    assert (timeline.peak_bytes, timeline.peak_node) == (140, "conv2")
    assert [t.tensor for t in timeline.live] == ["conv:0", "conv2:0"]
    allocations = [e[1] for e in timeline.events if e[0]]
    assert allocations == ["conv:0", "conv2:0", "mul:0"]
    assert (timeline.working_bytes, timeline.working_node) == (140, "conv2")


def test_cpu_executor_runs_depth_first_and_gpu_breadth_first():
    def graph(expensive):
        return Dataflow([
            node("root", "Conv3D", out=4, expensive=expensive),
            node("a", "Conv3D", ["root:0"], 4, expensive=expensive),
            node("b", "Conv3D", ["root:0"], 4, expensive=expensive),
            node("shape", "Reshape", ["root:0"], 4, expensive=False),
            node("a2", "Conv3D", ["a:0"], 4, expensive=expensive),
        ], {}, {}, [])

    # CPU: the cheap Reshape runs inline; a and b go to the pool (last pushed runs first).
    assert [n.name for n in schedule.executor_order(graph(True))] == [
        "root", "shape", "b", "a", "a2"]
    # GPU: every kernel is inline, first ready first run.
    assert [n.name for n in schedule.executor_order(graph(False))] == [
        "root", "a", "b", "shape", "a2"]


def test_host_nodes_run_once_the_device_has_no_inline_work():
    flow = Dataflow([
        node("act", "Relu", out=4),
        node("cheap", "Reshape", ["act:0"], 4, expensive=False),
        node("next", "Conv3D", ["act:0"], 4),
        node("swap_out", "DeepCopy", ["act:0"], 4),
        node("last", "Conv3D", ["next:0"], 4),
    ], {}, {}, [])
    flow.nodes[3].on_host = True
    # One executor: the swap-out is the last ready sibling, so it runs inline before "next",
    # which goes to the pool because the cheap Reshape is queued inline.
    assert [n.name for n in schedule.executor_order(flow)] == [
        "act", "cheap", "swap_out", "next", "last"]
    # Across devices: act's _Send to the host is expensive and, as the Reshape is queued
    # inline, goes to the pool with "next". Listed last, it is the pool's front: the swap-out
    # runs once the Reshape is done.
    assert [n.name for n in schedule.executor_order(flow, host_sends=True)] == [
        "act", "cheap", "swap_out", "next", "last"]
    # Listed first (Grappler put the swap-out before "next"), "next" is the front: it and its
    # chain run first, and the swap-out (act still on the device) only when the pool reaches
    # the send.
    flow.positions = {"act": 0, "swap_out": 1, "cheap": 2, "next": 3, "last": 4}
    assert [n.name for n in schedule.executor_order(flow, host_sends=True)] == [
        "act", "cheap", "next", "last", "swap_out"]


def test_swap_ins_wait_for_the_hosts_send_beneath_later_work():
    flow = Dataflow([
        node("act", "Relu", out=4),
        node("swap_out", "DeepCopy", ["act:0"], 4),
        node("gated", "Conv3D", ["act:0"], 4, preds=["act", "swap_out"]),
        node("other", "Conv3D", ["gated:0"], 4),
        node("trigger", "Conv3D", ["other:0"], 4),
        node("swap_in", "DeepCopy", ["swap_out:0"], 4, preds=["swap_out", "trigger"]),
        node("grad", "Conv3D", ["swap_in:0", "trigger:0"], 4),
    ], {}, {}, [])
    flow.nodes[1].on_host = True
    # act's _Send is its only ready successor, so it runs at once and the swap-out is next.
    # The swap-out's data _Send goes to the pool; the NoOp grouping the ops that wait for it
    # (cheap) and its control _Send run inline, and their _Recv puts "gated" in front of the
    # data _Send. The pass goes on from "gated"; the swap-in, ready by its trigger, comes back
    # when the pool reaches the data _Send.
    order = [n.name for n in schedule.executor_order(flow, host_sends=True)]
    assert order == ["act", "swap_out", "gated", "other", "trigger", "swap_in", "grad"]


def test_a_hosts_send_is_listed_where_grappler_put_the_host_node():
    def order(positions):
        flow = Dataflow([
            node("add", "AddV2", out=4),
            node("relu", "Relu", ["add:0"], 4),
            node("swap_out", "DeepCopy", ["add:0"], 4),
        ], {}, {}, [])
        flow.nodes[2].on_host = True
        flow.positions = positions
        return [n.name for n in schedule.executor_order(flow, host_sends=True)]

    # Grappler put the swap-out before the Relu: add's _Send comes first and goes to the
    # pool; the Relu, the last ready op, runs inline, and add stays on the device until then.
    assert order({"add": 0, "swap_out": 1, "relu": 2}) == ["add", "relu", "swap_out"]
    # After the Relu (or unknown: swap nodes are created last), the _Send runs inline.
    assert order({"add": 0, "relu": 1, "swap_out": 2}) == ["add", "swap_out", "relu"]
    assert order({}) == ["add", "swap_out", "relu"]


def test_the_batch_comes_in_after_the_steps_other_roots():
    flow = Dataflow([
        node("data", "Placeholder", out=4),
        node("swap_out", "DeepCopy", ["data:0"], 4),
        node("conv", "Conv3D", ["data:0"], 4),
        node("seed", "ReadVariableOp", out=4),
        node("noise", "StatelessRandomUniformV2", ["seed:0"], 4),
    ], {}, {}, [])
    flow.nodes[1].on_host = True
    # The step's IteratorGetNext runs after every other root, so the forward pass starts
    # when their chains are done.
    assert [n.name for n in schedule.executor_order(flow, host_sends=True)] == [
        "seed", "noise", "data", "swap_out", "conv"]


def test_rewritten_convolution_gradients_are_ordered_as_tensorflow_lists_them():
    # TensorFlow creates a convolution's input gradient before its filter gradient.
    flow = Dataflow([
        node("dy", "Mul", out=4),
        node("input", "Conv3DBackpropInputV2", ["dy:0"], 4),
        node("filter", "Conv3DBackpropFilterV2", ["dy:0"], 4),
        node("next", "Relu", ["input:0"], 4),
    ], {}, {}, [])
    # In creation order the filter gradient is the last ready sibling, so it runs inline.
    assert [n.name for n in schedule.executor_order(flow)] == ["dy", "filter", "input", "next"]
    # oneDNN replaces both by new nodes listed in reverse post-order (filter first): the input
    # gradient runs inline and the filter gradient waits in the pool until the end.
    late = frozenset({"Conv3DBackpropFilterV2", "Conv3DBackpropInputV2"})
    assert [n.name for n in schedule.executor_order(flow, late)] == [
        "dy", "input", "next", "filter"]


def test_gradient_siblings_can_be_visited_in_reverse_creation_order():
    # An instance norm's gradient: the input's gradient (product, freed at once by its sum) and
    # the mean's (a sum whose branch tiles a gradient-sized buffer) read the same gradient.
    flow = Dataflow([
        node("grad", "LeakyReluGrad", out=64),
        node("mean", "Sum", ["grad:0"], 4),
        node("tile", "Tile", ["mean:0"], 64),
        node("product", "Mul", ["grad:0"], 64),
        node("sum", "Sum", ["product:0"], 4),
        node("addn", "AddN", ["tile:0", "sum:0"], 64),
    ], {}, {}, [])
    for n in flow.nodes:
        n.phase = "backward"
    # Creation order: the last ready sibling (the product) runs inline first.
    order = schedule.executor_order(flow)
    assert [n.name for n in order] == ["grad", "product", "sum", "mean", "tile", "addn"]
    assert liveness.replay(flow, order).peak_bytes == 132
    # Reversed, as TensorFlow runs one of the paper's network's blocks: the tiled mean gradient
    # is live while the product is made.
    order = schedule.executor_order(flow, reverse_gradients=True)
    assert [n.name for n in order] == ["grad", "mean", "tile", "product", "sum", "addn"]
    assert liveness.replay(flow, order).peak_bytes == 192


def test_bfc_serves_a_request_from_an_unsplit_chunk():
    allocator = bfc.BFCAllocator(limit=2**30, allow_growth=False)
    first = allocator.allocate(3 * MIB)
    allocator.allocate(1 * MIB)
    allocator.free(first)  # a free 3 MiB chunk before the 1 MiB one
    chunk = allocator.allocate(2 * MIB)  # 3 MiB < 2 x 2 MiB: not split
    assert (chunk.address, chunk.size) == (first.address, 3 * MIB)
    assert allocator.in_use == 4 * MIB and allocator.peak == 4 * MIB
    assert bfc.rounded(1) == 256 and bfc.bin_for(3 * MIB) == 13


def test_bfc_grows_regions_and_runs_out_at_its_limit():
    allocator = bfc.BFCAllocator(limit=8 * MIB, allow_growth=True)
    allocator.allocate(1 * MIB)  # first region: 2 MiB
    allocator.allocate(3 * MIB)  # needs a 4 MiB region
    assert allocator.regions == 2 and allocator.region_bytes == 6 * MIB
    with pytest.raises(bfc.OutOfMemory):
        allocator.allocate(3 * MIB)  # 2 MiB left under the limit
    events = [(True, "a", MIB, True), (True, "h", MIB, False), (False, "a", MIB, True)]
    assert bfc.replay(events, [MIB], 2**30, False) == 2 * MIB  # host buffers not counted


@pytest.fixture(scope="module")
def dense_step():
    """x[8, 64] -> relu(x W1) -> relu(. W2) -> mean: forward only, every size known."""
    w1, w2 = tf.Variable(tf.ones((64, 256))), tf.Variable(tf.ones((256, 32)))

    @tf.function(autograph=False)
    def forward(x):
        h = tf.nn.relu(tf.matmul(x, w1), name="act1")
        h = tf.nn.relu(tf.matmul(h, w2), name="act2")
        return tf.reduce_mean(h)

    graph = forward.get_concrete_function(tf.TensorSpec([8, 64], tf.float32)).graph
    return StepGraph.analyse(graph, graph.outputs, batch_size=8)


def test_a_traced_graph_becomes_nodes_with_known_sizes(dense_step):
    flow = dataflow.build(dense_step, "/CPU:0", [("weights", 64 * 256 * 4 + 256 * 32 * 4)])
    assert flow.resident == {"weights": 98304, "inputs": 8 * 64 * 4, "constants": 8}
    timeline = liveness.replay(flow, schedule.executor_order(flow))
    # MatMul 8x256 (8 KiB) -> Relu in place -> MatMul 8x32 (1 KiB) while the first is live.
    assert timeline.peak_bytes == 8 * 256 * 4 + 8 * 32 * 4
    assert flow.flops == 2 * 8 * 64 * 256 + 2 * 8 * 256 * 32 + 8 * 256 + 8 * 32  # and relus
    assert flow.largest_tensor == (8 * 256, "act1:0")


def test_identical_ops_are_merged_as_grappler_does():
    @tf.function(autograph=False)
    def twice(x):
        return tf.reduce_sum(tf.cast(x > 0.5, tf.float32)) + tf.reduce_sum(
            tf.cast(x > 0.5, tf.float32))

    graph = twice.get_concrete_function(tf.TensorSpec([4, 4], tf.float32)).graph
    flow = dataflow.build(StepGraph.analyse(graph, graph.outputs), "/CPU:0")
    assert sum(n.type == "Greater" for n in flow.nodes) == 1
    assert sum(n.type == "Cast" for n in flow.nodes) == 1


def test_scaled_shapes_keep_the_aspect_and_the_divisor():
    assert scaled_shape((160, 192, 128), 96, 16) == (80, 96, 64)
    assert candidate_shapes((128, 128, 64), 16, 64)[:3] == [(16, 16, 16), (32, 32, 16),
                                                            (48, 48, 16)]


@pytest.fixture(scope="module")
def tiny():
    return config_from_dict({"model": {"base_filters": 4, "depth": 3, "dropout": 0.1},
                             "train": {"batch_size": 2}})


def test_simulate_step_reports_every_figure_the_sweep_uses(tiny):
    estimate = simulate_step(tiny, (16, 16, 16), 2, executor="cpu")
    assert estimate.peak_bytes > estimate.op_output_peak_bytes > estimate.step_peak_bytes > 0
    assert estimate.bound_bytes < estimate.peak_bytes and estimate.bound_op
    assert estimate.host_bytes == estimate.swapped_bytes == 0
    assert estimate.flops > 0 and estimate.largest_tensor_elements == 2 * 16**3 * 8
    assert set(estimate.to_dict()) >= {"peak_bytes", "op_output_peak_bytes", "bound_bytes",
                                       "bound_op", "host_bytes", "swapped_bytes", "flops",
                                       "largest_tensor_elements", "breakdown", "live_at_peak"}
    assert estimate.breakdown["inputs"] == 2 * 16**3 * 7 * 4


def test_swapping_lowers_the_predicted_peak_and_needs_host_memory(tiny):
    plain = simulate_step(tiny, (32, 32, 32), 2, executor="cpu")
    swapped = simulate_step(tiny, (32, 32, 32), 2, plan=True, executor="cpu")
    assert swapped.op_output_peak_bytes < 0.6 * plain.op_output_peak_bytes
    assert swapped.swapped_tensors > 10 and swapped.host_bytes > 0
    assert swapped.settings["swapout_threshold"] == tiny.lms.swapout_threshold


def test_a_swapped_trace_knows_the_node_order_grappler_returns():
    config = load_config("configs/demo.yaml")
    _, flow = analysed(trace_step(config, (16, 16, 16), 1, SwapSettings()), "cpu")
    swap_outs = [n for n in flow.nodes if n.on_host]
    assert swap_outs and all(n.name in flow.positions for n in swap_outs)
    producers = [(n.preds[0], n.name) for n in swap_outs if n.preds[0] in flow.positions]
    assert len(producers) > len(swap_outs) // 2
    assert all(flow.positions[p] < flow.positions[s] for p, s in producers)
    # Without a plan there is nothing to place: no Grappler run.
    _, plain = analysed(trace_step(config, (16, 16, 16), 1), "cpu")
    assert not plain.positions
