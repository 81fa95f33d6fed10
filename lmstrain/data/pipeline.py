"""tf.data input pipelines: cached volumes -> (image, regions) batches, with random flips."""

import logging
import re
from contextlib import contextmanager

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from lmstrain import errors
from lmstrain.errors import DataError, LmstrainError, RunError

log = logging.getLogger("lmstrain.data")


def prepare_cases(cases, cache, on_error="fail"):
    """Preprocess every case not yet in ``cache`` (with a progress bar); return the usable ones.

    A case that cannot be read raises its :class:`DataError` (``on_error="fail"``) or is left
    out with a warning (``"skip"``).
    """
    todo = [case for case in cases if not cache.has(case)]
    bad = set()
    for case in tqdm(todo, desc="Preprocessing", unit="case", disable=None if todo else True):
        try:
            cache.load(case)
        except DataError as err:
            if on_error == "fail":
                raise DataError(f"{err} (set data.on_error: skip to leave such cases out)") \
                    from None
            log.warning("skipping %s", err)
            bad.add(case.case_id)
    return [case for case in cases if case.case_id not in bad]


def make_dataset(cases, cache, batch_size, *, training, seed=0, flip=True):
    """Batches of ``(image (N,X,Y,Z,4) float32, regions (N,X,Y,Z,3) float32)``.

    Training datasets are shuffled, flipped at random along each axis, and repeat forever;
    validation datasets pass over the cases once, in order.
    """
    shape = cache.shape

    def load(index):
        case = cases[int(index)]
        try:
            image, regions = cache.load(case)
        except LmstrainError:
            raise
        except Exception as err:  # e.g. a file gone or a full disk: name the case
            raise RunError(f"case {case.case_id}: cannot load it for training: "
                           f"{type(err).__name__}: {err}") from None
        return image.astype(np.float32), regions.astype(np.float32)

    def load_tf(index):
        image, regions = tf.numpy_function(load, [index], (tf.float32, tf.float32))
        return tf.ensure_shape(image, (*shape, 4)), tf.ensure_shape(regions, (*shape, 3))

    ds = case_order(len(cases), seed) if training else tf.data.Dataset.range(len(cases))
    ds = ds.map(load_tf, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if training and flip:
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=seed)))
        ds = ds.map(lambda pair, rnd: random_flip(*pair, rnd), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=training)
    return ds.prefetch(tf.data.AUTOTUNE)


def case_order(n: int, seed: int) -> tf.data.Dataset:
    """Case indices for training, pass after pass over the ``n`` cases, each pass in the order
    of a permutation drawn from ``(seed, pass)`` alone. A shuffle buffer's order would depend
    on how many iterators are made over the dataset: under ``MirroredStrategy`` Keras's first
    epoch saw the cases in another order than on one device."""
    n64 = tf.constant(n, tf.int64)

    def shuffled(position):
        key = tf.stack([tf.constant(seed, tf.int64), position // n64])
        return tf.random.experimental.index_shuffle(position % n64, key, n64 - 1)

    return tf.data.Dataset.counter().map(shuffled)


@contextmanager
def input_errors():
    """Re-raise lmstrain's error from a tf.data worker (which TensorFlow wraps in an
    ``OpError`` carrying its traceback as text) as that error, a one-line message."""
    try:
        yield
    except tf.errors.OpError as err:
        found = re.search(r"lmstrain\.errors\.(\w+): (.+)", err.message)
        if found is None:
            raise
        raise getattr(errors, found.group(1))(found.group(2)) from None


def random_flip(image, regions, rnd):
    """Flip image and regions together along each spatial axis with probability 1/2."""
    coins = tf.random.stateless_uniform([3], seed=tf.stack([rnd, tf.constant(0, tf.int64)]))
    for axis in range(3):
        flip = coins[axis] < 0.5
        image = tf.cond(flip, lambda a=axis: tf.reverse(image, [a]), lambda: image)
        regions = tf.cond(flip, lambda a=axis: tf.reverse(regions, [a]), lambda: regions)
    return image, regions
