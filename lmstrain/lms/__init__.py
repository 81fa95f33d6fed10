"""TFLMS-style activation swapping for Keras 3 on TensorFlow 2.x, and its memory simulator.

``LMS`` is the callback; ``split_cpu`` prepares a CPU-only machine (compute /CPU:0, host
/CPU:1); ``verify_swaps`` proves from post-optimisation graphs that swap nodes are live;
``lmstrain.lms.measure`` replays the profiler's allocation events into a device memory peak.
``simulate_step`` predicts a training step's device memory from its traced graph and
``max_size`` the largest input size that fits a budget, with or without swapping.
"""

from lmstrain.lms.callback import LMS
from lmstrain.lms.devices import split_cpu
from lmstrain.lms.estimate import MemoryEstimate
from lmstrain.lms.plan import SwapPlan
from lmstrain.lms.rewrite import SwapCycleError
from lmstrain.lms.settings import LMSParameterError, SwapSettings
from lmstrain.lms.simulate import simulate_step
from lmstrain.lms.sizing import SizeLimit, max_size
from lmstrain.lms.verify import SwapCheck, record_graphs, verify_swaps

__all__ = ["LMS", "LMSParameterError", "MemoryEstimate", "SizeLimit", "SwapCheck",
           "SwapCycleError", "SwapPlan", "SwapSettings", "max_size", "record_graphs",
           "simulate_step", "split_cpu", "verify_swaps"]
