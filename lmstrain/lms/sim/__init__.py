"""The memory simulator: predict a training step's device memory from its traced graph.

:func:`estimate_model` predicts any compiled Keras model's step, with or without swapping
(auto-tuned for a budget if asked); :mod:`lmstrain.lms.sim.trace` traces the step,
:mod:`~lmstrain.lms.sim.dataflow` turns it into what costs memory,
:mod:`~lmstrain.lms.sim.schedule` emulates TensorFlow's executor order,
:mod:`~lmstrain.lms.sim.liveness` replays it, :mod:`~lmstrain.lms.sim.bfc` models the BFC
allocator, :mod:`~lmstrain.lms.sim.estimate` assembles a :class:`MemoryEstimate`, and
:mod:`~lmstrain.lms.sim.autotune` searches swap settings that fit a budget.
"""

from lmstrain.lms.sim.autotune import Choice
from lmstrain.lms.sim.estimate import MemoryEstimate
from lmstrain.lms.sim.trace import Trace, estimate_model

__all__ = ["Choice", "MemoryEstimate", "Trace", "estimate_model"]
