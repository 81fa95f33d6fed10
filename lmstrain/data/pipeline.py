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


def make_dataset(cases, cache, batch_size, *, training, seed=0, flip=True, pass_length=None,
                 first_pass=0, shard=None):
    """Batches of ``(image (N,X,Y,Z,4) float32, regions (N,X,Y,Z,3) float32)``.

    Training datasets are shuffled (:func:`case_order`: ``pass_length`` cases of each pass,
    from pass ``first_pass`` on), flipped at random along each axis, and repeat forever;
    validation datasets pass over the cases once, in order. ``shard=(index, count, block)``:
    one worker's share of the training stream, every ``count``-th block of ``block`` cases
    from the ``index``-th on, so that ``count`` workers together read the stream one process
    would read.
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

    if not training:
        ds = tf.data.Dataset.range(len(cases)).map(load_tf, num_parallel_calls=tf.data.AUTOTUNE,
                                                   deterministic=True)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    ds = case_order(len(cases), seed, pass_length, first_pass)
    if flip:  # the coins of each position in the stream, whichever worker reads it
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=seed)))
    if shard is not None:
        index, count, block = shard
        ds = ds.batch(block, drop_remainder=True).shard(count, index).unbatch()
    if flip:
        ds = ds.map(lambda i, rnd: random_flip(*load_tf(i), rnd),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = ds.map(load_tf, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def case_order(n: int, seed: int, pass_length: int | None = None,
               first_pass: int = 0) -> tf.data.Dataset:
    """Case indices for training, pass after pass over the ``n`` cases, each pass in the order
    of a permutation drawn from ``(seed, pass)`` alone. A shuffle buffer's order would depend
    on how many iterators are made over the dataset: under ``MirroredStrategy`` Keras's first
    epoch saw the cases in another order than on one device. ``pass_length`` (<= ``n``):
    each pass takes only that many cases of its permutation (multi-worker epochs of whole
    global batches: a different remainder is left out each pass); ``first_pass``: the
    stream starts there (a resumed multi-worker run continues the passes)."""
    n64 = tf.constant(n, tf.int64)
    length = tf.constant(pass_length or n, tf.int64)

    def shuffled(position):
        key = tf.stack([tf.constant(seed, tf.int64), first_pass + position // length])
        return tf.random.experimental.index_shuffle(position % length, key, n64 - 1)

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
