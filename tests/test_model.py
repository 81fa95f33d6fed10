import numpy as np
import pytest

from lmstrain.config import config_from_dict
from lmstrain.errors import ConfigError
from lmstrain.model import build_model
from lmstrain.model.losses import DiceBCELoss, DiceLoss, soft_dice
from lmstrain.model.metrics import RegionDice


def config(**model):
    return config_from_dict({"model": {"base_filters": 4, "depth": 3, **model}})


@pytest.mark.parametrize("name", ["isensee2017", "unet"])
@pytest.mark.parametrize("shape", [(16, 16, 16), (32, 16, 24)])
def test_builds_one_sigmoid_output_of_three_regions(name, shape):
    model = build_model(config(name=name), shape)
    assert model.input_shape == (None, *shape, 4)
    assert model.output_shape == (None, *shape, 3)
    out = model(np.random.default_rng(0).normal(size=(1, *shape, 4)).astype("float32")).numpy()
    assert out.min() >= 0 and out.max() <= 1


def test_isensee_depth_and_filters_follow_the_config():
    model = build_model(config(depth=4, base_filters=6), (32, 32, 32))
    conv_filters = sorted({layer.filters for layer in model.layers if hasattr(layer, "filters")})
    assert conv_filters == [3, 6, 12, 24, 48]
    assert model.get_layer("enc3_in_conv").strides == (2, 2, 2)
    # Deep supervision: three segmentation heads summed into the one output.
    assert len([layer for layer in model.layers if layer.name.endswith("_seg")]) == 3
    plain = build_model(config(depth=4, deep_supervision=False), (32, 32, 32))
    assert len([layer for layer in plain.layers if layer.name.endswith("_seg")]) == 1


def test_sizes_the_network_cannot_take_are_rejected_with_the_sizes_that_work():
    with pytest.raises(ConfigError, match=r"data.shape \[18, 16, 16\]: isensee2017 with depth 3 "
                                          r"needs every edge to be a multiple of 4; 18 is not"):
        build_model(config(), (18, 16, 16))
    with pytest.raises(ConfigError, match=r"nearest that work: 16, 32"):
        build_model(config(depth=5), (24, 32, 32))


def test_soft_dice_matches_hand_computation():
    t = np.zeros((1, 2, 1, 1, 3), "float32")
    p = np.zeros((1, 2, 1, 1, 3), "float32")
    t[0, :, 0, 0, 0] = [1, 1]
    p[0, :, 0, 0, 0] = [1, 0.5]   # region 0: 2*1.5 / (2 + 1.5)
    t[0, 0, 0, 0, 1] = 1          # region 1: truth only -> ~0
    # region 2: both empty -> smooth/smooth = 1
    smooth = 1e-5
    expected = np.mean([(2 * (1.5 + smooth / 2)) / (3.5 + smooth),
                        smooth / (1 + smooth), 1.0])
    assert soft_dice(t, p, smooth).shape == (1,)  # one value per sample (see the docstring)
    assert float(soft_dice(t, p, smooth)[0]) == pytest.approx(expected, rel=1e-6)
    assert float(DiceLoss()(t, p)) == pytest.approx(1 - expected, rel=1e-5)
    bce = DiceBCELoss()(t, p)
    assert float(bce) > float(DiceLoss()(t, p))


def test_region_dice_is_hard_per_sample_and_counts_empty_as_one():
    t = np.zeros((2, 2, 2, 1, 3), "float32")
    p = np.zeros((2, 2, 2, 1, 3), "float32")
    t[0, :, :, 0, 0] = 1           # sample 0, WT: 4 true voxels
    p[0, :2, :1, 0, 0] = 0.9       # 2 predicted, both right -> 2*2 / (4+2)
    p[0, 0, 1, 0, 0] = 0.4         # below threshold: not predicted
    metric = RegionDice("wt")
    metric.update_state(t, p)      # sample 1 WT: both empty -> 1
    assert float(metric.result()) == pytest.approx((4 / 6 + 1) / 2)
    mean = RegionDice("mean")
    mean.update_state(t, p)        # TC and ET empty everywhere -> 1
    assert float(mean.result()) == pytest.approx(((4 / 6 + 1 + 1) / 3 + 1) / 2)
