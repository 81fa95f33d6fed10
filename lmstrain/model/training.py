"""The one place that builds a compiled training model for a config, input size and step
count: the network, the dtype policy, the optimizer and schedule, the loss and the region
metrics. ``fit``, the simulator, the maxres trials and the benchmarks all use it."""

import keras

from lmstrain.config import Config
from lmstrain.model.losses import make_loss
from lmstrain.model.metrics import region_metrics
from lmstrain.model.unet3d import build_model


def training_model(config: Config, shape: tuple[int, ...] | None = None,
                   steps_per_epoch: int = 1) -> keras.Model:
    """The network of ``config`` at ``shape`` (default ``data.shape``), built under the
    configured dtype policy (``train.mixed_precision``) and compiled for training.

    ``steps_per_epoch`` sets the length of the learning-rate schedules.
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16" if config.train.mixed_precision else "float32")
    try:
        model = build_model(config, shape)
    finally:
        keras.config.set_dtype_policy(previous)
    return _compile(model, config, steps_per_epoch)


def _compile(model: keras.Model, config: Config, steps_per_epoch: int) -> keras.Model:
    """Compile ``model`` with the configured optimizer, schedule, loss and region metrics."""
    t = config.train
    total_steps = max(1, t.epochs * steps_per_epoch)
    lr = t.learning_rate
    if t.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(t.learning_rate, decay_steps=total_steps)
    elif t.lr_schedule == "poly":
        lr = keras.optimizers.schedules.PolynomialDecay(t.learning_rate, total_steps,
                                                        end_learning_rate=0.0, power=0.9)
    optimizer = {
        "adam": lambda: keras.optimizers.Adam(lr),
        "adamw": lambda: keras.optimizers.AdamW(lr),
        "sgd": lambda: keras.optimizers.SGD(lr, momentum=0.99, nesterov=True),
    }[t.optimizer]()
    model.compile(optimizer=optimizer, loss=make_loss(config), metrics=region_metrics(),
                  steps_per_execution=t.steps_per_execution)
    return model
