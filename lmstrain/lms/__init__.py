"""TFLMS-style activation swapping for Keras 3 on TensorFlow 2.x: a library on its own.

``LMS`` is the callback; :class:`SwapSettings` what it swaps and when; ``split_cpu`` prepares a
CPU-only machine (compute /CPU:0, host /CPU:1); ``verify_swaps`` proves from
post-optimisation graphs that swap nodes are live. The memory simulator is
:mod:`lmstrain.lms.sim` (``estimate_model`` for any compiled Keras model) and the profiler
replay that measures device-attributed peaks is :mod:`lmstrain.lms.profile`. This package
imports only the standard library, TensorFlow, Keras, NumPy and itself; its names load on
first use, so ``lmstrain.lms.settings`` can be read without starting TensorFlow.
"""

import importlib

_EXPORTS = {
    "LMS": "callback", "split_cpu": "devices", "BoundExceededError": "errors",
    "LMSError": "errors", "LMSParameterError": "errors", "SwapCycleError": "errors",
    "SwapPlan": "plan", "SwapSettings": "settings", "SwapCheck": "verify",
    "record_graphs": "verify", "verify_swaps": "verify",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmstrain.lms' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lmstrain.lms.{_EXPORTS[name]}"), name)
