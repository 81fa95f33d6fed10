"""Profiler-based measurements: allocation replay, and swap-ins starting after their trigger."""

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from lmstrain.lms import LMS, record_graphs, verify_swaps
from lmstrain.lms.profile import replay as measure
from lmstrain.model.unet3d import isensee2017
from profiling import ProfileStep

ROOT = Path(__file__).resolve().parent.parent


def write_trace(path, events):
    """An xplane file with one host line; events are (time_ps, name, stats)."""
    space = xplane_pb2.XSpace()
    plane = space.planes.add(name="/host:CPU")
    names = sorted({name for _, name, _ in events})
    for i, name in enumerate(names, 1):
        plane.event_metadata[i].name = name
    stat_ids = {}
    line = plane.lines.add(timestamp_ns=0)
    for time, name, stats in events:
        event = line.events.add(metadata_id=names.index(name) + 1, offset_ps=time,
                                duration_ps=stats.pop("duration", 0))
        for key, value in stats.items():
            stat_id = stat_ids.setdefault(key, len(stat_ids) + 1)
            plane.stat_metadata[stat_id].name = key
            stat = event.stats.add(metadata_id=stat_id)
            if isinstance(value, str):
                stat.str_value = value
            else:
                stat.uint64_value = value
    path.mkdir(parents=True)
    (path / "host.xplane.pb").write_bytes(space.SerializeToString())


def alloc(time, op, addr, size):
    return (time, "MemoryAllocation", {"tf_op": op, "addr": addr, "requested_bytes": size,
                                       "allocation_bytes": 2 * size, "region_type": "output"})


def free(time, addr):
    return (time, "MemoryDeallocation", {"addr": addr})


def test_device_peak_replays_buffers_by_address(tmp_path):
    write_trace(tmp_path / "trace", [
        alloc(10, "fn/conv", 1, 100),
        alloc(20, "fn/relu", 2, 50),
        alloc(30, "fn/lms/t1/relu_0/swap_out", 3, 50),  # a host copy: not on the device
        free(40, 1),
        alloc(50, "fn/grad", 1, 30),  # the address is reused by a new buffer
        free(60, 2),
        free(70, 1),
        (15, "fn/conv:Conv3D", {"duration": 4}),
    ])
    space = measure.load_xspace(tmp_path)
    buffers = measure.buffers(space)
    assert [(b.op, b.start_ps, b.end_ps) for b in buffers] == [
        ("fn/conv", 10, 40), ("fn/relu", 20, 60), ("fn/lms/t1/relu_0/swap_out", 30, None),
        ("fn/grad", 50, 70)]
    peak = measure.device_peak(buffers, on_device=lambda op: "/lms/" not in op)
    assert (peak.peak_bytes, peak.peak_allocation_bytes, peak.peak_time_ps) == (150, 300, 20)
    assert peak.top() == [{"op": "fn/conv", "bytes": 100, "region": "output"},
                          {"op": "fn/relu", "bytes": 50, "region": "output"}]
    assert measure.op_runs(space) == [measure.OpRun("fn/conv", "Conv3D", 15, 19)]


def test_the_batch_tf_data_builds_is_attributed_to_iterator_get_next(tmp_path):
    write_trace(tmp_path / "trace", [
        (5, "IteratorGetNextOp::DoCompute", {"duration": 10}),
        alloc(6, "", 4, 64),  # an element copy of the batch's size (batch size 1)
        alloc(7, "", 2, 16),  # a tf.data temporary of another size
        alloc(8, "", 1, 64),  # the batch (tf.data does not name the op)
        alloc(20, "", 3, 64),  # allocated after the op: not the batch
        free(30, 1),
    ])
    space = measure.load_xspace(tmp_path)
    buffers = measure.buffers(space)
    batch = measure.attribute_batch(space, buffers, {64})
    assert [(b.op, b.start_ps, b.end_ps, b.region) for b in batch] == [
        ("IteratorGetNext", 8, 30, "output")]
    assert [b.op for b in buffers] == ["", "", "IteratorGetNext", ""]



def test_swap_ins_start_after_their_trigger_finished(tmp_path):
    keras.utils.set_random_seed(0)
    model = isensee2017((16, 16, 16), base_filters=4, depth=3)
    model.compile("adam", "mse")
    lms = LMS(host_device="/CPU:1", batch_size=1)
    x = np.random.default_rng(0).random((3, 16, 16, 16, 4), dtype="float32")
    with record_graphs() as recorded:
        model.fit(x, x[..., :3], batch_size=1, shuffle=False, verbose=0,
                  callbacks=[lms, ProfileStep(2, tmp_path)])
    assert max(c.live_swap_nodes for c in verify_swaps(recorded.run_metadata, lms.plans)) >= 10
    timings = measure.swapin_timings(measure.op_runs(measure.load_xspace(tmp_path)), lms.plans)
    planned = {i.name for i in lms.plans[-1].swap_ins}
    assert len(planned) >= 5
    assert {t.swap_in for t in timings} == planned  # every swap-in ran in the profiled step
    late = [t for t in timings if not t.after_trigger]
    assert late == []  # and each started after its trigger finished


@pytest.mark.slow
def test_lms_effect_script_measures_a_lower_device_peak(tmp_path):
    out = tmp_path / "lms_effect.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "lms_effect.py"), "--sizes", "32",
                    "--repeats", "1", "--out", str(out)], check=True)
    result = json.loads(out.read_text())["sizes"]["32^3"]
    assert result["reduction"]["median"] > 0
    assert "MemoryAllocation" in result["device_peak_bytes_with_lms"]["measure"]
