"""3D U-Nets for BraTS: the Isensee et al. 2017 network and a plain U-Net.

Both take ``(X, Y, Z, 4)`` inputs (channels_last) and return one sigmoid output of shape
``(X, Y, Z, 3)``: the WT, TC and ET regions.
"""

import contextlib

import keras
from keras import layers

from lmstrain.config import divisor, misfit_edges
from lmstrain.errors import ConfigError
from lmstrain.model.layers import InstanceNormalization, RecomputedModule, SplitConcatConv3D

N_CHANNELS = 4
N_REGIONS = 3
# model.remat values built inside keras.RematScope, and the scope's mode. On Keras 3.15 "full"
# and "larger_than" also wrap Functional.call, which receives training=, and fail in model.fit
# ("The custom_gradient decorator currently supports keywords arguments only when eager
# execution is enabled"); keras_layers names the conv, normalisation and activation layers of
# the context and localisation modules (dropout takes training= as well).
KERAS_REMAT = {"keras_full": "full", "keras_larger_than": "larger_than",
               "keras_activations": "activations", "keras_layers": "list_of_layers"}


def build_model(config, input_shape=None):
    """Build the uncompiled network named by ``config.model`` for ``input_shape`` (x, y, z).

    ``input_shape`` defaults to ``config.data.shape``. Raises :class:`ConfigError` when the
    network cannot take that size.
    """
    m = config.model
    shape = tuple(int(s) for s in (input_shape or config.data.shape))
    check_input_shape(shape, m.depth, m.name)
    if m.remat == "blocks" and (m.name != "isensee2017" or m.norm == "batch"):
        raise ConfigError(f"model.remat: blocks recomputes isensee2017's context and "
                          f"localisation modules; got model.name {m.name}, model.norm {m.norm} "
                          "(batch normalisation would update its statistics twice): use "
                          "isensee2017 with instance or no normalisation")
    with remat_scope(m.remat, m.depth):
        if m.name == "isensee2017":
            return isensee2017(shape, base_filters=m.base_filters, depth=m.depth,
                               dropout=m.dropout, norm=m.norm,
                               deep_supervision=m.deep_supervision,
                               split_concat=m.split_concat, recompute=m.remat == "blocks")
        return unet(shape, base_filters=m.base_filters, depth=m.depth, norm=m.norm,
                    split_concat=m.split_concat)


def remat_scope(remat, depth):
    """The ``keras.RematScope`` a ``keras_*`` value of ``model.remat`` builds the network in
    (a null context otherwise)."""
    if remat not in KERAS_REMAT:
        return contextlib.nullcontext()
    if remat == "keras_layers":
        names = [f"{part}{level}_{module}{i}_{kind}" for level in range(depth)
                 for part, module in (("enc", "ctx"), ("dec", "loc")) for i in (1, 2)
                 for kind in ("conv", "norm", "act")]
        return keras.RematScope(mode="list_of_layers", layer_names=names)
    return keras.RematScope(mode=KERAS_REMAT[remat])


def check_input_shape(shape, depth, name="the network"):
    """Raise :class:`ConfigError` when a network of ``depth`` levels cannot take ``shape``."""
    bad, near = misfit_edges(shape, depth)
    if bad:
        raise ConfigError(
            f"data.shape {list(shape)}: {name} with depth {depth} needs every edge to be a "
            f"multiple of {divisor(depth)}; {', '.join(map(str, bad))} is not (nearest that "
            f"work: {', '.join(map(str, near))})")


def isensee2017(input_shape, base_filters=16, depth=5, dropout=0.3, norm="instance",
                deep_supervision=True, split_concat=False, recompute=False):
    """The BraTS 2017 network of Isensee et al., as in the Keras 3DUnetCNN code.

    Each level: a 3x3x3 conv (stride 2 below the top), then a context module (conv block,
    spatial dropout, conv block) added back residually. Decoder: upsample + conv, concatenate
    the skip, localisation module (3x3x3 then 1x1x1 conv blocks). Deep supervision sums 1x1x1
    segmentation outputs of the three finest decoder levels, upsampled, before the sigmoid.
    ``split_concat``: see :func:`skip_join`. ``recompute``: each context and localisation
    module is a :class:`RecomputedModule` (activations recomputed in the backward pass).
    """
    inputs = keras.Input((*input_shape, N_CHANNELS), name="image")
    x, skips = inputs, []
    for level in range(depth):
        filters = base_filters * 2**level
        name = f"enc{level}"
        x = conv_block(x, filters, strides=1 if level == 0 else 2, norm=norm, name=f"{name}_in")
        context = [*conv_block_layers(filters, norm=norm, name=f"{name}_ctx1"),
                   layers.SpatialDropout3D(dropout, name=f"{name}_dropout"),
                   *conv_block_layers(filters, norm=norm, name=f"{name}_ctx2")]
        x = layers.Add(name=f"{name}_add")([x, module(x, context, recompute, f"{name}_context")])
        skips.append(x)

    n_supervised = min(3, depth - 1) if deep_supervision else 1
    segmentations = []
    for level in range(depth - 2, -1, -1):
        filters = base_filters * 2**level
        name = f"dec{level}"
        x = layers.UpSampling3D(2, name=f"{name}_upsample")(x)
        x = conv_block(x, filters, norm=norm, name=f"{name}_up")
        x = skip_join(skips[level], x, split_concat, name=f"{name}_concat")
        localisation = [*conv_block_layers(filters, norm=norm, name=f"{name}_loc1",
                                           pair=split_concat),
                        *conv_block_layers(filters, kernel_size=1, norm=norm,
                                           name=f"{name}_loc2")]
        x = module(x, localisation, recompute, f"{name}_localisation")
        if level < n_supervised:
            segmentations.append(layers.Conv3D(N_REGIONS, 1, name=f"{name}_seg")(x))

    out = segmentations[0]  # coarsest supervised level first
    for level, seg in enumerate(segmentations[1:]):
        out = layers.UpSampling3D(2, name=f"seg_upsample{level}")(out)
        out = layers.Add(name=f"seg_sum{level}")([out, seg])
    out = layers.Activation("sigmoid", dtype="float32", name="regions")(out)
    return keras.Model(inputs, out, name="isensee2017")


def module(x, stages, recompute, name):
    """Apply the layers ``stages`` to ``x``; with ``recompute`` as one
    :class:`RecomputedModule` named ``name`` (``model.remat: blocks``)."""
    if recompute:
        return RecomputedModule(stages, name=name)(x)
    for stage in stages:
        x = stage(x)
    return x


def unet(input_shape, base_filters=16, depth=5, norm="instance", split_concat=False):
    """A plain 3D U-Net: two conv blocks per level, max-pooling, transposed-conv upsampling.
    ``split_concat``: see :func:`skip_join`."""
    inputs = keras.Input((*input_shape, N_CHANNELS), name="image")
    x, skips = inputs, []
    for level in range(depth):
        filters = base_filters * 2**level
        if level:
            x = layers.MaxPooling3D(2, name=f"enc{level}_pool")(x)
        x = conv_block(x, filters, norm=norm, activation="relu", name=f"enc{level}_conv1")
        x = conv_block(x, filters, norm=norm, activation="relu", name=f"enc{level}_conv2")
        skips.append(x)
    for level in range(depth - 2, -1, -1):
        filters = base_filters * 2**level
        x = layers.Conv3DTranspose(filters, 2, strides=2, name=f"dec{level}_up")(x)
        x = skip_join(skips[level], x, split_concat, name=f"dec{level}_concat")
        x = conv_block(x, filters, norm=norm, activation="relu", name=f"dec{level}_conv1")
        x = conv_block(x, filters, norm=norm, activation="relu", name=f"dec{level}_conv2")
    x = layers.Conv3D(N_REGIONS, 1, name="seg")(x)
    out = layers.Activation("sigmoid", dtype="float32", name="regions")(x)
    return keras.Model(inputs, out, name="unet")


def skip_join(skip, up, split_concat, name):
    """The decoder's join of a skip connection and the upsampled tensor, for the conv block
    that follows: their concatenation, or with ``split_concat`` the pair ``[skip, up]``, which
    :func:`conv_block` convolves without concatenating (:class:`SplitConcatConv3D`, the same
    layer with the same weights)."""
    if split_concat:
        return [skip, up]
    return layers.Concatenate(name=name)([skip, up])


def conv_block(x, filters, kernel_size=3, strides=1, norm="instance", activation="leaky_relu",
               name=None):
    """Conv3D -> normalisation -> activation (LeakyReLU 0.01 or ReLU).

    ``x`` may be a pair ``[skip, up]`` (:func:`skip_join`): the conv is then the Conv3D of
    their concatenation computed as :class:`SplitConcatConv3D` (stride 1).
    """
    for layer in conv_block_layers(filters, kernel_size, strides, norm, activation, name,
                                   pair=isinstance(x, list)):
        x = layer(x)
    return x


def conv_block_layers(filters, kernel_size=3, strides=1, norm="instance",
                      activation="leaky_relu", name=None, pair=False):
    """The layers of :func:`conv_block`; ``pair``: the input is ``[skip, up]``."""
    use_bias = norm == "none"
    if pair:
        block = [SplitConcatConv3D(filters, kernel_size, use_bias=use_bias, name=f"{name}_conv")]
    else:
        block = [layers.Conv3D(filters, kernel_size, strides=strides, padding="same",
                               use_bias=use_bias, name=f"{name}_conv")]
    if norm == "instance":
        block.append(layers.GroupNormalization(groups=-1, name=f"{name}_norm"))
    elif norm == "instance_lean":
        block.append(InstanceNormalization(name=f"{name}_norm"))
    elif norm == "batch":
        block.append(layers.BatchNormalization(name=f"{name}_norm"))
    if activation == "leaky_relu":
        return block + [layers.LeakyReLU(negative_slope=0.01, name=f"{name}_act")]
    return block + [layers.ReLU(name=f"{name}_act")]
