"""Networks, losses and training metrics."""

from lmstrain.model.unet3d import build_model, check_input_shape, divisor

__all__ = ["build_model", "check_input_shape", "divisor"]
