"""Measured memory of a training step: the profiler's allocation events replayed by address
(:mod:`~lmstrain.lms.profile.replay`) and a step probe that times and profiles one step
(:mod:`~lmstrain.lms.profile.probe`)."""

from lmstrain.lms.profile.probe import StepProbe, profiled_peaks

__all__ = ["StepProbe", "profiled_peaks"]
