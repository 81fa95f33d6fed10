"""Swapping changes no number, also where Grappler's arithmetic optimizer rewrites the step.

A small transformer that this project did not write (self-attention, layer normalisation,
dense layers with gelu; no convolutions) trains bit-identically with and without ``LMS``, with
Grappler's default options. Before the planner kept the arithmetic optimizer's rewrites
possible, a prefetch trigger edge from a layer normalisation's last add (the next block's
input) stopped Grappler from merging that add chain into an AddN, and the loss differed by
1e-7. The CPU is split into /CPU:0 and /CPU:1 by tests/conftest.py.
"""

from collections import Counter

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from lmstrain.lms import LMS, record_graphs, verify_swaps

# Op types the arithmetic optimizer creates or removes when it merges or fuses arithmetic.
ARITHMETIC = {"Add", "AddV2", "AddN", "Mul", "Sub", "Square", "SquaredDifference", "Sqrt",
              "Rsqrt", "Softmax", "Log", "LogSoftmax"}


def transformer(blocks=2, seq=16, dim=32, heads=2):
    inputs = keras.Input((seq, dim))
    x = inputs
    for _ in range(blocks):
        attention = layers.MultiHeadAttention(num_heads=heads, key_dim=dim // heads)(x, x)
        x = layers.LayerNormalization()(layers.Add()([x, attention]))
        hidden = layers.Dense(2 * dim, activation="gelu")(x)
        x = layers.LayerNormalization()(layers.Add()([x, layers.Dense(dim)(hidden)]))
    outputs = layers.Dense(4)(layers.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs)


class StepLosses(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def train(lms=None):
    """Fit 2 epochs of 4 steps with fixed seeds; (losses per step, weights, step graph)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 16, 32)).astype("float32")
    y = rng.normal(size=(16, 4)).astype("float32")
    keras.utils.set_random_seed(0)
    model = transformer()
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    losses = StepLosses()
    with record_graphs() as recorded:
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
                  callbacks=[losses] + ([lms] if lms else []))
    run_metadata = recorded.run_metadata
    step = max((f.post_optimization_graph for f in run_metadata.function_graphs),
               key=lambda g: len(g.node))
    return losses.losses, model.get_weights(), step, run_metadata


def arithmetic_ops(graph):
    return Counter(n.op for n in graph.node if n.op in ARITHMETIC and "/lms/" not in n.name)


def test_transformer_trains_bit_identically_with_grappler_defaults():
    assert tf.config.optimizer.get_experimental_options().get("arithmetic_optimization", True)
    losses, weights, graph, _ = train()
    lms = LMS(min_tensor_bytes=1024, host_device="/CPU:1", compute_device="/CPU:0")
    losses_lms, weights_lms, graph_lms, run_metadata = train(lms)

    assert len(lms.plans[-1].swapped) >= 5
    assert max(c.live_swap_nodes for c in verify_swaps(run_metadata, lms.plans)) >= 10
    # Grappler rewrote the arithmetic of both steps alike (e.g. the same AddN merges)...
    assert arithmetic_ops(graph_lms) == arithmetic_ops(graph)
    # ...so every step's loss and every final weight are bit-identical.
    assert len(losses) == 8 and losses_lms == losses
    assert len(weights_lms) == len(weights)
    assert all(np.array_equal(a, b) for a, b in zip(weights_lms, weights))
