"""Data-parallel training (``train.distribute: mirrored``) and swapping per replica.

TensorFlow's own MirroredStrategy over logical CPUs (tests/conftest.py splits the CPU into
four: replicas on /CPU:0 and /CPU:1, their hosts /CPU:2 and /CPU:3). Dropout 0, flips off and
instance normalisation, so that two replicas of batch 1 compute what one device computes at
batch 2. Adds about two minutes to the default run.
"""

import csv
import json
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from click.testing import CliRunner

from lmstrain.cli import main
from lmstrain.config import config_from_dict
from lmstrain.errors import ConfigError
from lmstrain.lms import LMS, record_graphs, verify_swaps
from lmstrain.lms.errors import LMSParameterError
from lmstrain.lms.profile import replay as measure
from profiling import ProfileStep

REPLICAS = ["/CPU:0", "/CPU:1"]
HOSTS = ["CPU:2", "CPU:3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, brats2021_root):
    """Four runs of two epochs, same seed and data order: one device at batch 2 and at batch 1
    (with swapping), two mirrored replicas at batch 1 without and with swapping."""
    tmp = tmp_path_factory.mktemp("distribute")
    raw = {
        "data": {"root": str(brats2021_root), "shape": [16, 16, 16], "flip": False,
                 "cache_dir": str(tmp / "cache")},
        "model": {"base_filters": 4, "depth": 3, "dropout": 0.0, "norm": "instance"},
        "train": {"epochs": 2, "batch_size": 2, "steps_per_epoch": 2, "learning_rate": 1e-3},
        "output": {"root": str(tmp / "runs")},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    mirrored = ["--set", "train.distribute=mirrored", "--set", "train.batch_size=1"]
    swapping = ["--set", "lms.enabled=true", "--set", "lms.verify=true"]
    variants = {"one": [], "one_b1_lms": ["--set", "train.batch_size=1", *swapping],
                "mirrored": mirrored, "mirrored_lms": mirrored + swapping}
    found = {}
    for name, extra in variants.items():
        result = CliRunner().invoke(main, ["fit", str(path), "--set", f"output.name={name}",
                                           *extra])
        assert result.exit_code == 0, result.output
        found[name] = next((tmp / "runs").glob(f"{name}-*"))
    return found


def losses(run_dir):
    with (run_dir / "history.csv").open() as handle:
        return [[float(row[k]) for k in ("loss", "val_loss")] for row in csv.DictReader(handle)]


def read(run_dir, name):
    return json.loads((run_dir / name).read_text())


def test_two_replicas_train_to_the_losses_of_one_device_with_and_without_swapping(runs):
    one = losses(runs["one"])
    assert len(one) == 2
    np.testing.assert_allclose(losses(runs["mirrored"]), one, rtol=1e-5)
    np.testing.assert_allclose(losses(runs["mirrored_lms"]), one, rtol=1e-5)
    assert losses(runs["mirrored_lms"]) == losses(runs["mirrored"])  # swapping: bit for bit
    parallel = read(runs["mirrored"], "summary.json")["distribute"]
    assert parallel == {"strategy": "mirrored", "workers": 1, "replicas": 2, "devices": REPLICAS,
                        "batch_size_per_replica": 1, "global_batch_size": 2}
    assert read(runs["one"], "summary.json")["distribute"]["replicas"] == 1


def swapped_tensors(plan):
    """The plan's swapped tensors by name without the replica's name scope, and bytes. The
    step's arguments (image, targets) are named by position among every replica's arguments,
    so they count as ``argument``."""
    names = [re.sub(r"(^|/)replica_\d+/", r"\1", s["tensor"]) for s in plan["swapped"]]
    return sorted(("argument" if re.fullmatch(r"data(_\d+)?:0", name) else name, s["bytes"])
                  for name, s in zip(names, plan["swapped"]))


def test_each_replica_swaps_what_one_device_swaps_at_the_per_replica_batch(runs):
    report = read(runs["mirrored_lms"], "lms_plan.json")
    assert report["distributed"] and [r["replica"] for r in report["replicas"]] == [0, 1]
    for replica, device, host in zip(report["replicas"], REPLICAS, HOSTS):
        assert replica["compute_device"].endswith(device[1:])
        assert replica["host_device"].endswith(host)
        assert replica["swapped_tensors"] > 10
    single = read(runs["one_b1_lms"], "lms_plan.json")["functions"][-1]
    plans = {p["replica"]: p for p in report["functions"]}  # the last trace of each replica
    assert sorted(plans) == [0, 1]
    for replica, plan in plans.items():
        assert plan["batch_size"] == 1
        assert swapped_tensors(plan) == swapped_tensors(single)
        assert plan["compute_device"].endswith(REPLICAS[replica][1:])
        assert plan["host_device"].endswith(HOSTS[replica])
    # lms.verify: every swap node of each replica is in the executed partition graphs, on
    # that replica's device (swap-ins) or host (swap-outs), with its trigger edge intact.
    checks = {c["replica"]: c for c in report["checks"] if c["found"]}
    assert sorted(checks) == [0, 1]
    assert all(c["ok"] and c["live_swap_nodes"] == c["swap_nodes"] > 20
               for c in checks.values())


def test_distribute_keys_are_checked_before_a_run():
    base = {"train": {"distribute": "mirrored"}}
    with pytest.raises(ConfigError, match=r"train\.devices: applies only with"):
        config_from_dict({"train": {"devices": ["/GPU:0"]}})
    with pytest.raises(ConfigError, match=r"lms\.compute_device: must be null"):
        config_from_dict({**base, "lms": {"compute_device": "/GPU:0"}})
    with pytest.raises(ConfigError, match=r"train\.devices: expected a list of local devices"):
        config_from_dict({"train": {"distribute": "mirrored", "devices": ["gpu0"]}})
    with pytest.raises(ConfigError, match=r"each device once, all GPUs or all CPUs"):
        config_from_dict({"train": {"distribute": "mirrored", "devices": ["/GPU:0", "/CPU:1"]}})
    with pytest.raises(ConfigError, match=r"lms\.host_device: /CPU:1 is one of train\.devices"):
        config_from_dict({"train": {"distribute": "mirrored", "devices": REPLICAS},
                          "lms": {"host_device": "/CPU:1"}})
    config = config_from_dict({"train": {"distribute": "mirrored", "devices": ["GPU:0", "GPU:1"]}})
    assert config.train.devices == ["GPU:0", "GPU:1"]


def test_a_missing_replica_device_is_a_one_line_error(tmp_path, tiny_config):
    path = tiny_config(train={"distribute": "mirrored", "devices": ["/CPU:0", "/CPU:7"]})
    result = CliRunner().invoke(main, ["fit", str(path)])
    assert result.exit_code == 2
    assert "train.devices: /CPU:7 is not a device of this machine" in result.output
    assert "Traceback" not in result.output



def train_mobilenet(lms=None, profile_dir=None):
    """MobileNetV2 (keras.applications) under MirroredStrategy on two replicas, 4 steps of 2
    per replica; the losses of each step."""
    keras.utils.set_random_seed(0)
    # The fit runs above used collective all-reduces; a later strategy's collectives in the
    # same process reuse their keys and clash on other shapes (a TensorFlow limitation of
    # several MirroredStrategy objects in one process), so this one reduces through /CPU:0.
    strategy = tf.distribute.MirroredStrategy(
        REPLICAS, cross_device_ops=tf.distribute.ReductionToOneDevice())
    with strategy.scope():
        model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), weights=None,
                                               classes=4, alpha=0.35)
        model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.random((16, 32, 32, 3), dtype="float32")
    y = rng.integers(0, 4, 16)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4, drop_remainder=True)
    steps = []
    callbacks = [keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: steps.append(float(logs["loss"])))]
    callbacks += [lms] if lms else []
    callbacks += [ProfileStep(2, profile_dir)] if profile_dir else []
    model.fit(data, epochs=1, verbose=0, callbacks=callbacks)
    return steps


def test_lms_under_mirrored_strategy_trains_a_keras_application_identically(tmp_path):
    without = train_mobilenet()
    lms = LMS(min_tensor_bytes=4096)
    with record_graphs() as recorded:
        with_lms = train_mobilenet(lms, profile_dir=tmp_path)
    assert with_lms == without
    executed = [c for c in verify_swaps(recorded.run_metadata, lms.plans) if c.found]
    assert sorted(c.replica for c in executed) == [0, 1]
    assert all(c.ok and c.live_swap_nodes > 20 for c in executed)
    plans = [p for p in lms.plans if p.replica is not None]
    timings = measure.swapin_timings(measure.op_runs(measure.load_xspace(tmp_path)), plans)
    planned = {i.name for p in plans for i in p.swap_ins}
    ran = {t.swap_in for t in timings}
    assert ran and ran <= planned
    assert {p.replica for p in plans if any(i.name in ran for i in p.swap_ins)} == {0, 1}
    assert [t for t in timings if not t.after_trigger] == []


def test_lms_refuses_a_compute_device_or_a_shared_device_under_a_strategy():
    strategy = tf.distribute.MirroredStrategy(REPLICAS)
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(LMSParameterError, match="does not apply under a tf.distribute"):
        LMS(compute_device="/CPU:0").set_model(model)
    with pytest.raises(LMSParameterError, match="a device a replica computes on"):
        LMS(host_device="/CPU:1").set_model(model)
    with pytest.raises(LMSParameterError, match="lists 1 devices for 2 replicas"):
        LMS(host_device=["/CPU:2"]).set_model(model)
    lms = LMS(host_device=["/CPU:3", "/CPU:2"])
    lms.set_model(model)
    assert [h[-5:] for h in (r["host_device"] for r in lms.plan_report()["replicas"])] == [
        "CPU:3", "CPU:2"]


def test_the_cpu_emulation_makes_a_device_per_replica_and_a_host_for_each():
    from lmstrain.training.distribute import logical_cpus, replica_devices

    def config(**train):
        lms = {"host_device": train.pop("host")} if "host" in train else {}
        return config_from_dict({"train": train, "lms": lms})

    assert (logical_cpus(config(), False), logical_cpus(config(), True)) == (1, 2)
    mirrored = config(distribute="mirrored")  # this machine has no GPU: two logical CPUs
    assert replica_devices(mirrored) == REPLICAS
    assert (logical_cpus(mirrored, False), logical_cpus(mirrored, True)) == (2, 4)
    three = config(distribute="mirrored", devices=["CPU:0", "/device:CPU:1", "/cpu:2"])
    assert replica_devices(three) == ["/CPU:0", "/CPU:1", "/CPU:2"]
    assert logical_cpus(three, True) == 6
    assert logical_cpus(config(distribute="mirrored", devices=REPLICAS, host="/CPU:5"),
                        True) == 6
