"""TFLMS-style activation swapping for Keras 3 on TensorFlow 2.x.

``LMS`` is the callback; ``split_cpu`` prepares a CPU-only machine (compute /CPU:0, host
/CPU:1); ``verify_swaps`` proves from post-optimisation graphs that swap nodes are live;
``lmstrain.lms.measure`` replays the profiler's allocation events into a device memory peak.
"""

from lmstrain.lms.callback import LMS
from lmstrain.lms.devices import split_cpu
from lmstrain.lms.plan import SwapPlan
from lmstrain.lms.rewrite import SwapCycleError
from lmstrain.lms.settings import LMSParameterError, SwapSettings
from lmstrain.lms.verify import SwapCheck, record_graphs, verify_swaps

__all__ = ["LMS", "LMSParameterError", "SwapCheck", "SwapCycleError", "SwapPlan",
           "SwapSettings", "record_graphs", "split_cpu", "verify_swaps"]
