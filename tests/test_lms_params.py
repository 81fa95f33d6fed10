"""LMS parameters: bad values are refused with a message saying what was received and allowed."""

import keras
import numpy as np
import pytest

from lmstrain.lms import LMS, LMSError


@pytest.mark.parametrize("kwargs, message", [
    ({"swapin_ahead": -1},
     "LMS swapin_ahead must be an integer >= 1 (levels before the consumer); got -1. Negative "
     "values do not mean 'automatic': that will be autotune=True."),
    ({"swapin_ahead": 0}, "LMS swapin_ahead must be an integer >= 1"),
    ({"swapout_threshold": -1}, "LMS swapout_threshold must be an integer >= 0 (levels); got -1"),
    ({"swapin_groupby": 1.5}, "LMS swapin_groupby must be an integer >= 0 (levels); got 1.5"),
    ({"min_tensor_bytes": True}, "LMS min_tensor_bytes must be an integer >= 0 (bytes); got True"),
    ({"sync_mode": 1},
     "LMS sync_mode must be one of 'async', 'swapout', 'swapin', 'both'; got 1."),
    ({"copy_mode": "memcpy"}, "LMS copy_mode must be one of 'snapshot', 'deepcopy'; got 'memcpy'."),
    ({"include_types": [3]}, "LMS include_types must be a list of non-empty strings; got [3]."),
    ({"exclude_scopes": None}, "LMS exclude_scopes must be a list of non-empty strings; got None."),
    ({"host_device": "the host"},
     "LMS host_device must be a device name such as '/CPU:0', '/GPU:0' or "
     "'/job:localhost/replica:0/task:0/device:CPU:1'; got 'the host'."),
    ({"compute_device": 0}, "LMS compute_device must be a device name"),
    ({"device_memory": -1}, "LMS device_memory must be a positive integer or None; got -1."),
    ({"batch_size": 0}, "LMS batch_size must be a positive integer or None; got 0."),
    ({"swap_in_ahead": 2}, "LMS got unknown argument(s) swap_in_ahead; swap settings are"),
    ({"autotune": "yes"}, "LMS autotune must be one of True, False; got 'yes'."),
    ({"verify": "yes"}, "LMS verify must be one of True, False; got 'yes'."),
])
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError) as error:
        LMS(**kwargs)
    assert message in str(error.value)
    assert isinstance(error.value, LMSError)


def test_config_style_values_are_accepted():
    lms = LMS(min_tensor_bytes=0, include_types=["Relu", "Conv3D"], exclude_scopes="dec0",
              host_device=None, compute_device="/job:localhost/replica:0/task:0/device:CPU:0",
              device_memory=16 * 2**30)
    assert lms.settings.include_types == ("Relu", "Conv3D")
    assert lms.settings.exclude_scopes == ("dec0",)


@pytest.mark.parametrize("kwargs, message", [
    ({"host_device": "/GPU:3"},
     "LMS host_device '/GPU:3' is not a device of this process; available: /CPU:0, /CPU:1, "
     "/CPU:2, /CPU:3."),
    ({"host_device": "/CPU:1", "compute_device": "/cpu:7"},
     "LMS compute_device '/cpu:7' is not a device of this process; available: /CPU:0, /CPU:1, "
     "/CPU:2, /CPU:3."),
])
def test_unknown_devices_are_refused_when_training_starts(kwargs, message):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="is not a device of this process") as error:
        model.fit(np.ones((2, 3)), np.ones((2, 2)), verbose=0, callbacks=[LMS(**kwargs)])
    assert str(error.value) == message


def test_the_callback_is_built_from_settings_declared_once():
    from lmstrain.config import load_config, swap_settings
    from lmstrain.lms import SwapSettings

    lms = LMS(SwapSettings(swapout_threshold=3), swapin_ahead=2)
    assert lms.settings == SwapSettings(swapout_threshold=3, swapin_ahead=2)
    config = load_config("configs/demo.yaml", ["lms.swapin_groupby=4"])
    assert swap_settings(config) == SwapSettings(swapin_groupby=4)
    assert LMS(swap_settings(config)).settings.swapin_groupby == 4
