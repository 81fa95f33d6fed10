"""lmstrain: train 3D U-Nets on BraTS at sizes that do not fit in GPU memory."""

__version__ = "0.1.0"
